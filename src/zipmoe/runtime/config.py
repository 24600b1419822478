"""Model hyper-parameters, read from the ``config.json`` a container embeds.

One `ModelArgs` describes every family the runtime serves; `ModelArgs.from_hf_config` maps each family's Hugging
Face config keys (and the defaults of its transformers config class when a key is missing or null) onto it.

A config.json is untrusted input: every field the runtime uses is checked for its type and range before anything is
built from it, and integers are capped (`MAX_LAYERS` ...) so that no config can ask for an absurd allocation.
`config_problems` lists every problem (``pack`` warns with them); `ModelArgs.from_hf_config` raises the first one.
This module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zipmoe.errors import ZipmoeError
from zipmoe.runtime.block_args import MlaArgs, RouterArgs
from zipmoe.runtime.deepseek_config import DEEPSEEK, deepseek_values
from zipmoe.runtime.fields import (
    MAX_CONTEXT,
    MAX_EXPERTS,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_VOCAB,
    Fields,
    first_set,
    show,
)  # fmt: skip
from zipmoe.runtime.rope_config import RopeArgs, parse_rope

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", *DEEPSEEK)

LAYER_TYPES = ("full_attention", "sliding_attention")
# max_position_embeddings when a config.json has none: the defaults of the transformers config classes.
DEFAULT_CONTEXT = {"mixtral": 131_072, "qwen2_moe": 32_768, "qwen3_moe": 32_768, "olmoe": 4096, "deepseek_v2": 2048,
                   "deepseek_v3": 4096}  # fmt: skip


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
    family = config.get("model_type")
    if family not in SUPPORTED:
        return None, [
            f"zipmoe run does not support model_type {show(family)} (supported: {', '.join(SUPPORTED)}); "
            "the container itself is fine and unpacks losslessly"
        ]
    f = Fields(config)
    n_layers = f.integer("num_hidden_layers", 1, MAX_LAYERS)
    hidden = f.integer("hidden_size", 1, MAX_HIDDEN)
    vocab = f.integer("vocab_size", 1, MAX_VOCAB)
    context = f.integer("max_position_embeddings", 1, MAX_CONTEXT, DEFAULT_CONTEXT[family])
    if family in DEEPSEEK:
        blocks = deepseek_values(f, family, n_layers)
    else:
        blocks = {**_attention(f, family, hidden, n_layers), **_experts(f, family, n_layers), "router": _router(family)}
    values = dict(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        n_layers=n_layers,
        **blocks,
        rms_eps=f.number("rms_norm_eps", 1e-6, below=1.0),
        rope=parse_rope(f, context, DEEPSEEK, family),
        tie_embeddings=f.flag("tie_word_embeddings", False),
        eos_token_ids=f.token_ids("eos_token_id", vocab),
        context=context,
    )
    if f.problems:
        return None, f.problems
    return ModelArgs(**values), []


def _attention(f: Fields, family: str, hidden: int | None, n_layers: int | None) -> dict[str, Any]:
    n_heads = f.integer("num_attention_heads", 1, MAX_HEADS)
    n_kv_heads = f.integer("num_key_value_heads", 1, MAX_HEADS, default=n_heads)
    if n_heads and n_kv_heads and n_heads % n_kv_heads:
        f.bad("num_key_value_heads", f"a divisor of num_attention_heads ({n_heads})", n_kv_heads)
    if f.doc.get("head_dim") is not None:
        head_dim = f.integer("head_dim", 1, MAX_HEAD_DIM)
    elif hidden and n_heads and hidden % n_heads:
        head_dim = f.bad("num_attention_heads", f"a divisor of hidden_size ({hidden}) without head_dim", n_heads)
    else:
        head_dim = hidden // n_heads if hidden and n_heads else None
    if head_dim and head_dim % 2:
        f.bad("head_dim", "even (rotary embeddings rotate pairs of features)", head_dim)
    if family == "qwen2_moe":
        qkv_bias, o_bias = f.flag("qkv_bias", True), False
    else:
        qkv_bias = f.flag("attention_bias", False)
        o_bias = family in ("qwen3_moe", "olmoe") and qkv_bias
    return dict(
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family),
        clip_qkv=f.number("clip_qkv", None) if family == "olmoe" else None,
        sliding_window=_windows(f, family, n_layers),
    )


def _windows(f: Fields, family: str, n_layers: int | None) -> tuple[int | None, ...] | None:
    """The sliding attention window of each layer, None for full causal attention."""
    window = f.integer("sliding_window", 0, MAX_CONTEXT, default=0)  # 0 or null: none (Qwen2-MoE configs write 0)
    use = f.flag("use_sliding_window", False)
    layer_types = f.choices("layer_types", LAYER_TYPES, n_layers)
    if n_layers is None:
        return None
    if not window or (family != "mixtral" and not use):
        return (None,) * n_layers
    if family == "mixtral":
        return (window,) * n_layers
    if f.doc.get("layer_types") is None:
        f.fail("use_sliding_window without layer_types is not supported")
    if layer_types is None:
        return None
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _experts(f: Fields, family: str, n_layers: int | None) -> dict[str, Any]:
    if family == "mixtral":  # Mixtral always renormalises the top-k weights and has no shared expert
        n_experts = f.integer("num_local_experts", 1, MAX_EXPERTS)
        moe_intermediate = dense_intermediate = f.integer("intermediate_size", 1, MAX_INTERMEDIATE)
        norm_topk, shared = True, 0
    else:  # Hub configs say num_experts; transformers 5 saves Qwen3-MoE's as num_local_experts
        n_experts = f.integer(first_set(f.doc, "num_experts", "num_local_experts"), 1, MAX_EXPERTS)
        moe_intermediate = f.integer(
            first_set(f.doc, "moe_intermediate_size", "intermediate_size"), 1, MAX_INTERMEDIATE
        )
        dense_intermediate = f.integer("intermediate_size", 0, MAX_INTERMEDIATE, default=0)
        norm_topk = f.flag("norm_topk_prob", False)
        shared = f.integer("shared_expert_intermediate_size", 0, MAX_INTERMEDIATE, 0) if family == "qwen2_moe" else 0
    gated = family == "qwen2_moe"
    sparse = _sparse_layers(f, family, n_layers)
    if sparse is not None and not all(sparse) and dense_intermediate == 0:
        f.bad("intermediate_size", "a positive integer: some layers are dense MLPs (mlp_only_layers)", 0)
    return dict(
        n_experts=n_experts,
        top_k=f.integer("num_experts_per_tok", 1, n_experts or MAX_EXPERTS),
        moe_intermediate=moe_intermediate,
        norm_topk_prob=norm_topk,
        sparse_layers=sparse,
        dense_intermediate=dense_intermediate,
        shared_expert_intermediate=shared,
        shared_expert_gated=gated,
    )


def _sparse_layers(f: Fields, family: str, n_layers: int | None) -> tuple[bool, ...] | None:
    """For each layer, whether it is a MoE block (Qwen-MoE: every ``decoder_sparse_step``-th, but mlp_only_layers)."""
    if family not in ("qwen2_moe", "qwen3_moe"):
        return None if n_layers is None else (True,) * n_layers
    step = f.integer("decoder_sparse_step", 1, MAX_LAYERS, default=1)
    dense = f.integers("mlp_only_layers", 0, (n_layers or MAX_LAYERS) - 1)
    if n_layers is None or step is None or dense is None:
        return None
    dense_layers = set(dense)
    sparse = tuple(layer not in dense_layers and (layer + 1) % step == 0 for layer in range(n_layers))
    if not any(sparse):
        f.fail(f"decoder_sparse_step {step} and mlp_only_layers {show(dense)} leave no MoE layer")
    return sparse


def _router(family: str) -> RouterArgs:
    """The GQA families route by softmax top-k; Mixtral keeps the weights in float32."""
    return RouterArgs(float32_weights=family == "mixtral")
