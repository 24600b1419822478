"""Config mapping shared by the grouped-query-attention families (Mixtral, Qwen2/3-MoE, OLMoE): attention heads,
sliding windows, routed experts and the demo ``config.json`` keys they have in common. Torch-free."""

from __future__ import annotations

from typing import Any

from zipmoe.runtime.block_args import RouterArgs
from zipmoe.runtime.fields import MAX_CONTEXT, MAX_EXPERTS, MAX_HEAD_DIM, MAX_HEADS, Fields

LAYER_TYPES = ("full_attention", "sliding_attention")


def attention(
    f: Fields,
    hidden: int | None,
    n_layers: int | None,
    *,
    qkv_bias: bool | None,
    o_bias: bool | None,
    sliding_window: tuple[int | None, ...] | None,
    qk_norm: str | None = None,
    clip_qkv: float | None = None,
) -> dict[str, Any]:
    """Grouped-query attention fields: heads, key/value heads (a divisor), head size (even), biases, norms, windows.

    ``qk_norm`` is None, ``"head"`` (per head, Qwen3-MoE) or ``"full"`` (over all q / k features, OLMoE).
    """
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
    return dict(
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        clip_qkv=clip_qkv,
        sliding_window=sliding_window,
    )


def window_by_layer_type(f: Fields, n_layers: int | None) -> tuple[int | None, ...] | None:
    """Qwen-style windows: ``sliding_window`` on the ``sliding_attention`` layers of ``layer_types``, when
    ``use_sliding_window``; None for full causal attention."""
    window = f.integer("sliding_window", 0, MAX_CONTEXT, default=0)  # 0 or null: none (Qwen2-MoE configs write 0)
    use = f.flag("use_sliding_window", False)
    layer_types = f.choices("layer_types", LAYER_TYPES, n_layers)
    if n_layers is None:
        return None
    if not window or not use:
        return (None,) * n_layers
    if f.doc.get("layer_types") is None:
        f.fail("use_sliding_window without layer_types is not supported")
    if layer_types is None:
        return None
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def routed_experts(
    f: Fields,
    n_layers: int | None,
    *,
    n_experts_key: str,
    moe_intermediate: int | None,
    dense_intermediate: int | None,
    norm_topk_prob: bool | None,
    sparse_layers: tuple[bool, ...] | None = None,
    shared_intermediate: int | None = 0,
    router: RouterArgs | None = None,
) -> dict[str, Any]:
    """The MoE fields of a softmax-top-k family: experts, top-k, intermediate sizes, MoE layers (every layer by
    default), a shared expert behind a sigmoid gate when ``shared_intermediate`` (Qwen2-MoE)."""
    n_experts = f.integer(n_experts_key, 1, MAX_EXPERTS)
    if sparse_layers is None and n_layers is not None:
        sparse_layers = (True,) * n_layers
    if sparse_layers is not None and not all(sparse_layers) and dense_intermediate == 0:
        f.bad("intermediate_size", "a positive integer: some layers are dense MLPs (mlp_only_layers)", 0)
    return dict(
        n_experts=n_experts,
        top_k=f.integer("num_experts_per_tok", 1, n_experts or MAX_EXPERTS),
        moe_intermediate=moe_intermediate,
        norm_topk_prob=norm_topk_prob,
        sparse_layers=sparse_layers,
        dense_intermediate=dense_intermediate,
        shared_expert_intermediate=shared_intermediate,
        shared_expert_gated=bool(shared_intermediate),
        router=router or RouterArgs(),
    )


def demo_attention(preset: Any) -> dict[str, Any]:
    """The attention keys of a GQA demo config."""
    return {
        "num_attention_heads": preset.heads,
        "num_key_value_heads": preset.kv_heads,
        "head_dim": preset.hidden // preset.heads,
    }
