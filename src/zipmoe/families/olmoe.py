"""OLMoE (``model_type`` ``olmoe``): GQA attention with RMSNorm over all query / key features and optional
``clip_qkv``, every layer a MoE block of ``gate_proj``/``up_proj``/``down_proj`` experts, no shared expert."""

from __future__ import annotations

from typing import Any

from zipmoe.families import Family
from zipmoe.families._gqa import attention, demo_attention, routed_experts, window_by_layer_type
from zipmoe.runtime.fields import MAX_INTERMEDIATE, Fields, first_set


def parse(f: Fields, name: str, n_layers: int | None, hidden: int | None) -> dict[str, Any]:
    bias = f.flag("attention_bias", False)
    values = attention(f, hidden, n_layers, qkv_bias=bias, o_bias=bias, qk_norm="full",
                       clip_qkv=f.number("clip_qkv", None), sliding_window=window_by_layer_type(f, n_layers))  # fmt: skip
    moe_intermediate = f.integer(first_set(f.doc, "moe_intermediate_size", "intermediate_size"), 1, MAX_INTERMEDIATE)
    return values | routed_experts(
        f, n_layers, n_experts_key="num_experts", moe_intermediate=moe_intermediate,
        dense_intermediate=f.integer("intermediate_size", 0, MAX_INTERMEDIATE, default=0),
        norm_topk_prob=f.flag("norm_topk_prob", False),
    )  # fmt: skip


def demo_config(preset: Any) -> dict[str, Any]:
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        **demo_attention(preset),
        "intermediate_size": preset.intermediate,
        "num_experts": preset.experts,
        "norm_topk_prob": False,
    }


FAMILIES = (
    Family(
        "olmoe",
        n_experts_keys=("num_experts",),
        projections=("gate_proj", "up_proj", "down_proj"),
        moe_blocks=("mlp",),
        default_context=4096,
        parse=parse,
        demo_config=demo_config,
    ),
)
