"""DeepSeek-V2 (``deepseek_v2``, V2 and V2-Lite) and DeepSeek-V3 (``deepseek_v3``, and the models built on it): multi-head latent attention, the first
``first_k_dense_replace`` layers dense, ungated shared experts, and their routers. Defaults are those of the
transformers config classes when a key is missing. This module does not import torch.

DeepSeek-V2 routes by softmax (``greedy`` or ``group_limited_greedy``); its weights are multiplied by
``routed_scaling_factor``, or with ``norm_topk_prob`` renormalised instead (the original DeepSeek code; no published
V2 config sets it, and transformers ignores it). DeepSeek-V3 routes by sigmoid with ``noaux_tc``. V3 checkpoints
store ``num_nextn_predict_layers`` multi-token-prediction layers after the last layer; the runtime ignores them.
"""

from __future__ import annotations

from typing import Any

from zipmoe.families import Family
from zipmoe.runtime.block_args import MlaArgs, RouterArgs
from zipmoe.runtime.fields import MAX_EXPERTS, MAX_HEAD_DIM, MAX_HEADS, MAX_INTERMEDIATE, MAX_LAYERS, Fields

# transformers' defaults that differ between the two.
_DEFAULTS = {
    "deepseek_v2": dict(norm_topk_prob=False, routed_scaling_factor=1.0, n_group=None, topk_group=None,
                        n_shared_experts=2, first_k_dense_replace=0),
    "deepseek_v3": dict(norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                        n_shared_experts=1, first_k_dense_replace=3),
}  # fmt: skip
_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}
_SCORING = {"deepseek_v2": "softmax", "deepseek_v3": "sigmoid"}


def parse(f: Fields, family: str, n_layers: int | None, hidden: int | None) -> dict[str, Any]:
    """The attention, expert and router fields of a DeepSeek config."""
    defaults = _DEFAULTS[family]
    n_heads = f.integer("num_attention_heads", 1, MAX_HEADS)
    mla = _mla(f, family)
    n_experts = f.integer("n_routed_experts", 1, MAX_EXPERTS)
    top_k = f.integer("num_experts_per_tok", 1, n_experts or MAX_EXPERTS)
    moe_intermediate = f.integer("moe_intermediate_size", 1, MAX_INTERMEDIATE)
    n_shared = f.integer("n_shared_experts", 0, MAX_EXPERTS, default=defaults["n_shared_experts"])
    first_dense = f.integer("first_k_dense_replace", 0, MAX_LAYERS, default=defaults["first_k_dense_replace"])
    f.integer("moe_layer_freq", 1, 1, default=1)  # every layer after the dense ones is MoE (as transformers builds)
    sparse = None
    if n_layers is not None and first_dense is not None:
        if first_dense >= n_layers:
            f.bad("first_k_dense_replace", f"below num_hidden_layers ({n_layers}): no layer would be MoE", first_dense)
        sparse = tuple(layer >= first_dense for layer in range(n_layers))
    dense_intermediate = f.integer("intermediate_size", 0, MAX_INTERMEDIATE, default=0)
    if first_dense and dense_intermediate == 0:
        f.bad("intermediate_size", "a positive integer: the first first_k_dense_replace layers are dense MLPs", 0)
    bias = f.flag("attention_bias", False)
    normalize = f.flag("norm_topk_prob", defaults["norm_topk_prob"])
    if family == "deepseek_v2":  # V2 renormalises instead of scaling, and only when there is more than one expert
        normalize = normalize and top_k is not None and top_k > 1
    return dict(
        n_heads=n_heads,
        n_kv_heads=n_heads,  # MLA expands keys and values for every head from the latent
        head_dim=mla.qk_rope_head_dim if mla else None,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=None,
        clip_qkv=None,
        sliding_window=None if n_layers is None else (None,) * n_layers,
        n_experts=n_experts,
        top_k=top_k,
        moe_intermediate=moe_intermediate,
        norm_topk_prob=normalize,
        sparse_layers=sparse,
        dense_intermediate=dense_intermediate,
        shared_expert_intermediate=(moe_intermediate or 0) * (n_shared or 0),
        shared_expert_gated=False,
        mla=mla,
        router=_router(f, family, n_experts, top_k, normalize),
        mtp_layers=_mtp_layers(f, family),
    )


def _mla(f: Fields, family: str) -> MlaArgs | None:
    # An explicit null q_lora_rank means queries are one projection (DeepSeek-V2-Lite); a missing one the default.
    no_q_lora = "q_lora_rank" in f.doc and f.doc["q_lora_rank"] is None
    q_lora = None if no_q_lora else f.integer("q_lora_rank", 1, MAX_HEAD_DIM * MAX_HEADS, default=1536)
    values = dict(
        kv_lora_rank=f.integer("kv_lora_rank", 1, MAX_HEAD_DIM * MAX_HEADS, default=512),
        qk_nope_head_dim=f.integer("qk_nope_head_dim", 0, MAX_HEAD_DIM, default=128),
        qk_rope_head_dim=f.integer("qk_rope_head_dim", 2, MAX_HEAD_DIM, default=64),
        v_head_dim=f.integer("v_head_dim", 1, MAX_HEAD_DIM, default=128),
    )
    rope = values["qk_rope_head_dim"]
    if rope is not None and rope % 2:
        f.bad("qk_rope_head_dim", "even (rotary embeddings rotate pairs of features)", rope)
        return None
    interleave = f.flag("rope_interleave", True) if family == "deepseek_v3" else True
    layout = "complex" if family == "deepseek_v2" else ("interleaved" if interleave else "half")
    if any(v is None for v in values.values()) or (q_lora is None and not no_q_lora):
        return None
    return MlaArgs(q_lora_rank=q_lora, rope_layout=layout, **values)


def _router(
    f: Fields, family: str, n_experts: int | None, top_k: int | None, normalize: bool | None
) -> RouterArgs | None:
    defaults = _DEFAULTS[family]
    scoring = f.choice("scoring_func", (_SCORING[family],), _SCORING[family])
    method = f.choice("topk_method", _METHODS[family], _METHODS[family][0])
    scaling = f.number("routed_scaling_factor", defaults["routed_scaling_factor"])
    if family == "deepseek_v2" and normalize:
        scaling = 1.0
    grouped = method in ("group_limited_greedy", "noaux_tc")
    n_group = f.integer("n_group", 1, MAX_EXPERTS, default=defaults["n_group"] if grouped else 1)
    topk_group = f.integer("topk_group", 1, n_group or MAX_EXPERTS, default=defaults["topk_group"] if grouped else 1)
    if grouped and n_group is None and f.doc.get("n_group") is None:
        f.fail(f"'n_group' is missing (topk_method {method!r} routes within groups of experts)")
    if grouped and topk_group is None and f.doc.get("topk_group") is None:
        f.fail(f"'topk_group' is missing (topk_method {method!r} keeps the best topk_group groups)")
    if None in (scoring, method, scaling, n_group, topk_group, n_experts, top_k):
        return None
    if n_experts % n_group:
        return f.bad("n_group", f"a divisor of n_routed_experts ({n_experts})", n_group)
    per_group = n_experts // n_group
    if method == "noaux_tc" and per_group < 2:
        return f.bad("n_group", f"at most n_routed_experts / 2 ({n_experts // 2}): noaux_tc scores a group by its two "
                     "best experts", n_group)  # fmt: skip
    if top_k > topk_group * per_group:
        return f.bad("num_experts_per_tok", f"at most topk_group x experts per group ({topk_group * per_group})", top_k)
    return RouterArgs(
        scoring=scoring,
        method=method,
        n_group=n_group,
        topk_group=topk_group,
        scaling=scaling,
        float32_logits=True,
        float32_weights=True,
        renorm_epsilon=1e-20,
    )


def _mtp_layers(f: Fields, family: str) -> int:
    """How many multi-token-prediction layers may follow the last layer (V3; ``num_mtp_layers`` when saved by
    transformers 5, which defaults to 1)."""
    if family != "deepseek_v3":
        return 0
    key = "num_nextn_predict_layers" if f.doc.get("num_nextn_predict_layers") is not None else "num_mtp_layers"
    return f.integer(key, 0, MAX_LAYERS, default=1) or 0


def demo_config(preset: Any) -> dict[str, Any]:
    """DeepSeek-V2-Lite's keys, its dimensions scaled to the preset's: MLA without a query projection rank (head size
    hidden / heads, half of it rotary, a latent of hidden / 4), softmax greedy routing, shared experts of
    ``moe_intermediate_size`` each (``preset.shared_intermediate`` in all), YaRN rope. For a 2048-wide, 16-head
    preset these are V2-Lite's own. Every layer is MoE: V2-Lite's one dense first layer is left out, as the bench
    presets keep two MoE layers of its 26."""
    head = preset.hidden // preset.heads
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "num_attention_heads": preset.heads,
        "num_key_value_heads": preset.heads,
        "q_lora_rank": None,
        "kv_lora_rank": preset.hidden // 4,
        "qk_nope_head_dim": head,
        "qk_rope_head_dim": head // 2,
        "v_head_dim": head,
        "intermediate_size": 8 * preset.intermediate,  # the dense MLP of first_k_dense_replace layers: none here
        "moe_intermediate_size": preset.intermediate,
        "n_routed_experts": preset.experts,
        "n_shared_experts": preset.shared_intermediate // preset.intermediate,
        "first_k_dense_replace": 0,
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "softmax",
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "attention_bias": False,
        "max_position_embeddings": 163_840,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    }  # fmt: skip


_COMMON = dict(n_experts_keys=("n_routed_experts",), projections=("gate_proj", "up_proj", "down_proj"),
               moe_blocks=("mlp",), parse=parse, demo_config=demo_config, yarn=True, routing="synthetic:deepseek")  # fmt: skip
FAMILIES = (
    Family("deepseek_v2", default_context=2048, **_COMMON),
    Family("deepseek_v3", default_context=4096, **_COMMON),
)
