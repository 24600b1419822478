"""Model hyper-parameters, read from the ``config.json`` a container embeds.

One `ModelArgs` describes every family the runtime serves; `ModelArgs.from_hf_config` maps each family's Hugging
Face config keys (and the defaults of its transformers config class when a key is missing) onto it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zipmoe.errors import ZipmoeError

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


class UnsupportedModelError(ZipmoeError, ValueError):
    """The container holds a model the runtime cannot run."""


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
    rope_theta: float
    n_experts: int
    top_k: int
    moe_intermediate: int  # per routed expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to one
    sparse_layers: tuple[bool, ...]  # True: MoE block; False: a dense MLP of `dense_intermediate`
    dense_intermediate: int
    shared_expert_intermediate: int  # 0: no shared expert (Qwen2-MoE has one, behind a sigmoid gate)
    qkv_bias: bool
    o_bias: bool
    qk_norm: str | None  # None, "head" (Qwen3-MoE: per head) or "full" (OLMoE: over all q / k features)
    clip_qkv: float | None
    sliding_window: tuple[int | None, ...]  # per layer
    tie_embeddings: bool
    eos_token_ids: tuple[int, ...]

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | None) -> ModelArgs:
        """Map a Hugging Face ``config.json`` onto `ModelArgs`.

        Raises:
            UnsupportedModelError: an architecture or feature the runtime does not implement (the message lists
                what is supported).
        """
        if not config:
            raise UnsupportedModelError("the container has no config.json; the runtime needs one to build the model")
        family = config.get("model_type")
        if family not in SUPPORTED:
            raise UnsupportedModelError(
                f"zipmoe run does not support model_type {family!r} (supported: {', '.join(SUPPORTED)}); "
                "the container itself is fine and unpacks losslessly"
            )
        get = config.get
        rope = get("rope_parameters") or get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"{family}: rope_type {rope_type!r} is not supported (only 'default')")
        hidden = _int(config, "hidden_size")
        n_heads = _int(config, "num_attention_heads")
        n_layers = _int(config, "num_hidden_layers")
        head_dim = get("head_dim") or hidden // n_heads
        if family == "mixtral":  # Mixtral always renormalises the top-k weights and has no shared expert
            n_experts = _int(config, "num_local_experts")
            moe_intermediate = _int(config, "intermediate_size")
            norm_topk, shared = True, 0
        else:
            n_experts = get("num_experts", get("num_local_experts"))
            moe_intermediate = get("moe_intermediate_size") or get("intermediate_size")
            norm_topk = bool(get("norm_topk_prob", False))
            shared = get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
        sparse = tuple(_is_sparse(config, family, i) for i in range(n_layers))
        return cls(
            family=family,
            vocab_size=_int(config, "vocab_size"),
            hidden_size=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
            n_experts=int(n_experts),
            top_k=_int(config, "num_experts_per_tok"),
            moe_intermediate=int(moe_intermediate),
            norm_topk_prob=norm_topk,
            sparse_layers=sparse,
            dense_intermediate=int(get("intermediate_size") or 0),
            shared_expert_intermediate=int(shared or 0),
            qkv_bias=bool(get("qkv_bias", True)) if family == "qwen2_moe" else bool(get("attention_bias", False)),
            o_bias=family in ("qwen3_moe", "olmoe") and bool(get("attention_bias", False)),
            qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family),
            clip_qkv=get("clip_qkv") if family == "olmoe" else None,
            sliding_window=tuple(_window(config, family, i) for i in range(n_layers)),
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            eos_token_ids=_ids(get("eos_token_id")),
        )


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsupportedModelError(f"config.json: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _is_sparse(config: dict[str, Any], family: str, layer: int) -> bool:
    if family in ("qwen2_moe", "qwen3_moe"):
        step = config.get("decoder_sparse_step", 1) or 1
        return layer not in (config.get("mlp_only_layers") or []) and (layer + 1) % step == 0
    return True


def _window(config: dict[str, Any], family: str, layer: int) -> int | None:
    """The sliding attention window of a layer, or None for full causal attention."""
    window = config.get("sliding_window")
    if not window:
        return None
    if family == "mixtral":
        return int(window)
    if not config.get("use_sliding_window", False):
        return None
    layer_types = config.get("layer_types")
    if not layer_types:
        raise UnsupportedModelError(f"{family}: use_sliding_window without layer_types is not supported")
    return int(window) if layer_types[layer] == "sliding_attention" else None
