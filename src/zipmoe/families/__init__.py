"""The model families zipmoe knows, one module each, shared by ``pack`` and the runtime.

A `Family` says everything architecture-specific in one place:

* for ``pack`` (`zipmoe.formats.experts`): which ``config.json`` key counts the routed experts, and how a routed
  expert's projections are named (``w1``/``w3``/``w2`` or ``gate_proj``/``up_proj``/``down_proj``), so that its
  tensors are stored one record per expert;
* for the runtime (`zipmoe.runtime.config`): how the family's ``config.json`` maps onto `ModelArgs` (``parse``:
  attention, MLP/experts and router fields, each checked), its default context, whether it may scale RoPE with YaRN,
  and where its router lives; the model (`zipmoe.runtime.model`) builds its blocks from those fields (GQA or MLA
  attention, softmax or sigmoid routing, gated or plain shared experts, dense layers);
* for planning and benchmarks: the synthetic routing it is planned with when no trace is given;
* for demo checkpoints (`zipmoe.demo`): the ``config.json`` keys transformers writes for it.

Adding a family is adding a module here with its `Family` and listing it in `_MODULES` (docs/RUNTIME.md, "Adding a
model family"). Nothing here imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zipmoe.runtime.fields import Fields


@dataclass(frozen=True)
class Family:
    """One architecture (a Hugging Face ``model_type``).

    Attributes:
        name: the ``model_type`` of its ``config.json``.
        n_experts_keys: config keys that may hold the number of routed experts, the first present wins.
        projections: the gate, up and down projection names of a routed expert (a fused checkpoint's
            ``gate_up_proj`` is recognised for every family).
        moe_blocks: the modules that may hold a MoE layer's router and experts, the Hub checkpoints' first
            (Mixtral's ``block_sparse_moe``; transformers 5 names it ``mlp`` in the fused state dicts it saves).
        default_context: ``max_position_embeddings`` when the config has none (the transformers default).
        parse: maps checked config fields to the family's `ModelArgs` fields: ``parse(fields, name, n_layers,
            hidden)`` returns attention, expert and router values (None where a field was bad; ``fields``
            collects the problems).
        demo_config: the family-specific ``config.json`` keys of a demo checkpoint (`zipmoe.demo.Preset`).
        yarn: whether its RoPE may be scaled with YaRN (else only plain RoPE is accepted).
        routing: the synthetic routing it is planned and benchmarked with when no trace is given.
    """

    name: str
    n_experts_keys: tuple[str, ...]
    projections: tuple[str, str, str]
    moe_blocks: tuple[str, ...]
    default_context: int
    parse: Callable[[Fields, str, int | None, int | None], dict[str, Any]]
    demo_config: Callable[[Any], dict[str, Any]]
    yarn: bool = False
    routing: str = "synthetic:qwen"


_MODULES = ("mixtral", "qwen_moe", "olmoe", "deepseek")
FAMILIES: tuple[Family, ...] = tuple(
    family for module in _MODULES for family in importlib.import_module(f"zipmoe.families.{module}").FAMILIES
)
NAMES = tuple(f.name for f in FAMILIES)


def family_for(model_type: object) -> Family | None:
    """The family of a ``model_type`` value (any JSON value: configs are untrusted), or None."""
    return next((f for f in FAMILIES if f.name == model_type), None)
