"""Mixtral (``model_type`` ``mixtral``): GQA attention with an optional sliding window on every layer, every layer a
MoE block (``block_sparse_moe``) of ``w1``/``w3``/``w2`` experts, top-k weights renormalised in float32, no shared
expert."""

from __future__ import annotations

from typing import Any

from zipmoe.families import Family
from zipmoe.families._gqa import attention, demo_attention, routed_experts
from zipmoe.runtime.block_args import RouterArgs
from zipmoe.runtime.fields import MAX_CONTEXT, MAX_INTERMEDIATE, Fields


def parse(f: Fields, name: str, n_layers: int | None, hidden: int | None) -> dict[str, Any]:
    window = f.integer("sliding_window", 0, MAX_CONTEXT, default=0)  # 0 or null: full attention
    windows = None if n_layers is None else (window or None,) * n_layers
    values = attention(f, hidden, n_layers, qkv_bias=f.flag("attention_bias", False), o_bias=False,
                       sliding_window=windows)  # fmt: skip
    intermediate = f.integer("intermediate_size", 1, MAX_INTERMEDIATE)
    return values | routed_experts(
        f, n_layers, n_experts_key="num_local_experts", moe_intermediate=intermediate, dense_intermediate=intermediate,
        norm_topk_prob=True, router=RouterArgs(float32_weights=True),
    )  # fmt: skip


def demo_config(preset: Any) -> dict[str, Any]:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **demo_attention(preset),
        "intermediate_size": preset.intermediate,
        "num_local_experts": preset.experts,
        "rms_norm_eps": 1e-5,
    }


FAMILIES = (
    Family(
        "mixtral",
        n_experts_keys=("num_local_experts",),
        projections=("w1", "w3", "w2"),
        moe_blocks=("block_sparse_moe", "mlp"),
        default_context=131_072,
        parse=parse,
        demo_config=demo_config,
    ),
)
