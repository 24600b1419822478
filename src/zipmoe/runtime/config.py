"""Model hyper-parameters, read from the ``config.json`` a container embeds.

One `ModelArgs` describes every family the runtime serves; `ModelArgs.from_hf_config` reads the keys all families
share and hands the rest to the family's module (`zipmoe.families`), which maps its Hugging Face config keys (and the
defaults of its transformers config class when a key is missing or null) onto the attention, expert and router
fields.

A config.json is untrusted input: every field the runtime uses is checked for its type and range before anything is
built from it, and integers are capped (`MAX_LAYERS` ...) so that no config can ask for an absurd allocation.
`config_problems` lists every problem (``pack`` warns with them); `ModelArgs.from_hf_config` raises the first one.
This module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zipmoe.errors import ZipmoeError
from zipmoe.families import NAMES, family_for
from zipmoe.runtime.block_args import MlaArgs, RouterArgs
from zipmoe.runtime.fields import MAX_CONTEXT, MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB, Fields, show
from zipmoe.runtime.rope_config import RopeArgs, parse_rope

SUPPORTED = NAMES  # every family of `zipmoe.families` runs


class UnsupportedModelError(ZipmoeError, ValueError):
    """The container holds a model the runtime cannot run (or a config.json it cannot trust)."""


@dataclass(frozen=True)
class ModelArgs:
    """Everything the runtime needs to build a model."""

    family: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope: RopeArgs
    n_experts: int
    top_k: int
    moe_intermediate: int  # per routed expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to one
    sparse_layers: tuple[bool, ...]  # True: MoE block; False: a dense MLP of `dense_intermediate`
    dense_intermediate: int
    shared_expert_intermediate: int  # 0: none; Qwen2-MoE's is gated, DeepSeek's n_shared_experts are one MLP
    shared_expert_gated: bool  # Qwen2-MoE: mlp.shared_expert behind a sigmoid gate; DeepSeek: mlp.shared_experts
    qkv_bias: bool
    o_bias: bool
    qk_norm: str | None  # None, "head" (Qwen3-MoE: per head) or "full" (OLMoE: over all q / k features)
    clip_qkv: float | None
    sliding_window: tuple[int | None, ...]  # per layer
    tie_embeddings: bool
    eos_token_ids: tuple[int, ...]
    context: int  # max_position_embeddings: the most tokens one sequence may hold
    router: RouterArgs
    mla: MlaArgs | None = None  # multi-head latent attention (DeepSeek) instead of grouped-query attention
    mtp_layers: int = 0  # multi-token-prediction layers stored after the last one (DeepSeek-V3), not run

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | None) -> ModelArgs:
        """Map a Hugging Face ``config.json`` onto `ModelArgs`, after checking every field the runtime uses.

        Raises:
            UnsupportedModelError: an architecture or feature the runtime does not implement (the message lists
                what is supported), or the first of `config_problems`.
        """
        args, problems = _parse(config)
        if problems:
            raise UnsupportedModelError(problems[0])
        return args


def config_problems(config: dict[str, Any] | None) -> list[str]:
    """Why ``zipmoe run`` would refuse this ``config.json``: one line per problem, empty when it can build the model.

    Args:
        config: the parsed ``config.json`` (None: there is none).

    Returns:
        One-line problems naming the key, what was expected and what was found.
    """
    return _parse(config)[1]


def read_token_ids(doc: dict[str, Any], key: str, vocab_size: int, file: str) -> tuple[int, ...]:
    """The token ids under ``key`` of a JSON object (an id, a list of ids, or null: none), within the vocabulary.

    Raises:
        UnsupportedModelError: not an id in ``0..vocab_size-1`` or a list of them.
    """
    fields = Fields(doc, file)
    ids = fields.token_ids(key, vocab_size)
    if fields.problems:
        raise UnsupportedModelError(fields.problems[0])
    return ids


def _parse(config: Any) -> tuple[ModelArgs | None, list[str]]:
    if not config:
        return None, ["the container has no config.json; the runtime needs one to build the model"]
    if not isinstance(config, dict):
        return None, [f"config.json must be a JSON object, got {type(config).__name__}"]
    family = family_for(config.get("model_type"))
    if family is None:
        return None, [
            f"zipmoe run does not support model_type {show(config.get('model_type'))} (supported: "
            f"{', '.join(SUPPORTED)}); the container itself is fine and unpacks losslessly"
        ]
    f = Fields(config)
    n_layers = f.integer("num_hidden_layers", 1, MAX_LAYERS)
    hidden = f.integer("hidden_size", 1, MAX_HIDDEN)
    vocab = f.integer("vocab_size", 1, MAX_VOCAB)
    context = f.integer("max_position_embeddings", 1, MAX_CONTEXT, family.default_context)
    values = dict(
        family=family.name,
        vocab_size=vocab,
        hidden_size=hidden,
        n_layers=n_layers,
        **family.parse(f, family.name, n_layers, hidden),
        rms_eps=f.number("rms_norm_eps", 1e-6, below=1.0),
        rope=parse_rope(f, context, family.yarn, family.name),
        tie_embeddings=f.flag("tie_word_embeddings", False),
        eos_token_ids=f.token_ids("eos_token_id", vocab),
        context=context,
    )
    if f.problems:
        return None, f.problems
    return ModelArgs(**values), []
