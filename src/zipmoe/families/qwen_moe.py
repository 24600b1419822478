"""Qwen1.5/Qwen2-MoE (``qwen2_moe``) and Qwen3-MoE (``qwen3_moe``): GQA attention (Qwen2: q/k/v biases; Qwen3:
RMSNorm per query / key head), optional sliding windows per ``layer_types``, MoE on every ``decoder_sparse_step``-th
layer except ``mlp_only_layers`` (dense MLPs), ``gate_proj``/``up_proj``/``down_proj`` experts; Qwen2-MoE adds a
shared expert behind a sigmoid gate."""

from __future__ import annotations

from typing import Any

from zipmoe.families import Family
from zipmoe.families._gqa import attention, demo_attention, routed_experts, window_by_layer_type
from zipmoe.runtime.fields import MAX_INTERMEDIATE, MAX_LAYERS, Fields, first_set, show


def parse(f: Fields, name: str, n_layers: int | None, hidden: int | None) -> dict[str, Any]:
    qwen2 = name == "qwen2_moe"
    if qwen2:
        qkv_bias, o_bias = f.flag("qkv_bias", True), False
    else:
        qkv_bias = o_bias = f.flag("attention_bias", False)
    values = attention(f, hidden, n_layers, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=None if qwen2 else "head",
                       sliding_window=window_by_layer_type(f, n_layers))  # fmt: skip
    # Hub configs say num_experts; transformers 5 saves Qwen3-MoE's as num_local_experts.
    n_experts_key = first_set(f.doc, "num_experts", "num_local_experts")
    moe_intermediate = f.integer(first_set(f.doc, "moe_intermediate_size", "intermediate_size"), 1, MAX_INTERMEDIATE)
    dense_intermediate = f.integer("intermediate_size", 0, MAX_INTERMEDIATE, default=0)
    norm_topk_prob = f.flag("norm_topk_prob", False)
    shared = f.integer("shared_expert_intermediate_size", 0, MAX_INTERMEDIATE, 0) if qwen2 else 0
    return values | routed_experts(
        f, n_layers, n_experts_key=n_experts_key, moe_intermediate=moe_intermediate,
        dense_intermediate=dense_intermediate, norm_topk_prob=norm_topk_prob, sparse_layers=_sparse_layers(f, n_layers),
        shared_intermediate=shared,
    )  # fmt: skip


def _sparse_layers(f: Fields, n_layers: int | None) -> tuple[bool, ...] | None:
    """For each layer, whether it is a MoE block: every ``decoder_sparse_step``-th, but ``mlp_only_layers``."""
    step = f.integer("decoder_sparse_step", 1, MAX_LAYERS, default=1)
    dense = f.integers("mlp_only_layers", 0, (n_layers or MAX_LAYERS) - 1)
    if n_layers is None or step is None or dense is None:
        return None
    dense_layers = set(dense)
    sparse = tuple(layer not in dense_layers and (layer + 1) % step == 0 for layer in range(n_layers))
    if not any(sparse):
        f.fail(f"decoder_sparse_step {step} and mlp_only_layers {show(dense)} leave no MoE layer")
    return sparse


def demo_config(preset: Any) -> dict[str, Any]:
    """Qwen2-MoE keys (the demo presets use the Qwen2 variant)."""
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **demo_attention(preset),
        "intermediate_size": preset.shared_intermediate,
        "moe_intermediate_size": preset.intermediate,
        "shared_expert_intermediate_size": preset.shared_intermediate,
        "num_experts": preset.experts,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
        "use_sliding_window": False,
    }


_COMMON = dict(projections=("gate_proj", "up_proj", "down_proj"), moe_blocks=("mlp",), default_context=32_768,
               parse=parse, demo_config=demo_config)  # fmt: skip
FAMILIES = (
    Family("qwen2_moe", n_experts_keys=("num_experts",), **_COMMON),
    Family("qwen3_moe", n_experts_keys=("num_experts", "num_local_experts"), **_COMMON),
)
