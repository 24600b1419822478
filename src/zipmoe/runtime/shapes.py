"""The tensors a model of given `ModelArgs` reads, by checkpoint name, and their shapes: what ``zipmoe run`` checks a
container against before it allocates anything (`zipmoe.runtime.weights.check_tensors`), and what demo checkpoints
are made of (`zipmoe.demo`). Torch-free.
"""

from __future__ import annotations

from collections.abc import Collection

from zipmoe.families import family_for
from zipmoe.runtime.config import ModelArgs


def router_name(args: ModelArgs, layer: int, names: Collection[str] = ()) -> str:
    """The router weight of MoE layer ``layer``: ``mlp.gate`` or, for Mixtral, ``block_sparse_moe.gate`` (or
    ``mlp.gate``, whichever of the family's blocks ``names`` holds; the first when none)."""
    candidates = [f"model.layers.{layer}.{block}.gate.weight" for block in family_for(args.family).moe_blocks]
    return next((name for name in candidates if name in names), candidates[0])


def correction_bias_name(router: str) -> str:
    """DeepSeek-V3's ``e_score_correction_bias`` beside the router weight named ``router``."""
    return router.removesuffix("weight") + "e_score_correction_bias"


def expert_shapes(args: ModelArgs, layer: int, expert: int) -> dict[str, tuple[int, ...]]:
    """The member tensors of one routed expert in per-expert layout, gate, down and up, with their shapes."""
    family = family_for(args.family)
    gate, up, down = family.projections
    h, i = args.hidden_size, args.moe_intermediate
    p = f"model.layers.{layer}.{family.moe_blocks[0]}.experts.{expert}."
    return {p + gate + ".weight": (i, h), p + down + ".weight": (h, i), p + up + ".weight": (i, h)}


def dense_shapes(args: ModelArgs, names: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
    """The dense tensors the model reads, by checkpoint name, with their shapes (``names``: the tensors a container
    holds, to find routers where the family has several places for them)."""
    h, v = args.hidden_size, args.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not args.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in range(args.n_layers):
        shapes.update(_attention_shapes(args, f"model.layers.{layer}."))
        p = f"model.layers.{layer}.mlp."
        if not args.sparse_layers[layer]:
            shapes.update(_mlp_shapes(p, args.dense_intermediate, h))
            continue
        router = router_name(args, layer, names)
        shapes[router] = (args.n_experts, h)
        if args.router.correction_bias:
            shapes[correction_bias_name(router)] = (args.n_experts,)
        if args.shared_expert_intermediate and args.shared_expert_gated:
            shapes.update(_mlp_shapes(p + "shared_expert.", args.shared_expert_intermediate, h))
            shapes[p + "shared_expert_gate.weight"] = (1, h)
        elif args.shared_expert_intermediate:
            shapes.update(_mlp_shapes(p + "shared_experts.", args.shared_expert_intermediate, h))
    return shapes


def _attention_shapes(args: ModelArgs, p: str) -> dict[str, tuple[int, ...]]:
    h, q, kv = args.hidden_size, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    if args.mla is not None:
        return {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                **_latent_attention_shapes(args, p + "self_attn.")}  # fmt: skip
    a = p + "self_attn."
    shapes = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
              a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
              a + "o_proj.weight": (h, q)}  # fmt: skip
    if args.qkv_bias:
        shapes.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
    if args.o_bias:
        shapes[a + "o_proj.bias"] = (h,)
    if args.qk_norm == "head":
        shapes.update({a + "q_norm.weight": (args.head_dim,), a + "k_norm.weight": (args.head_dim,)})
    elif args.qk_norm == "full":
        shapes.update({a + "q_norm.weight": (q,), a + "k_norm.weight": (kv,)})
    return shapes


def _latent_attention_shapes(args: ModelArgs, a: str) -> dict[str, tuple[int, ...]]:
    """DeepSeek's MLA projections under ``a`` (``model.layers.N.self_attn.``)."""
    m, h, n = args.mla, args.hidden_size, args.n_heads
    shapes = {a + "kv_a_proj_with_mqa.weight": (m.kv_lora_rank + m.qk_rope_head_dim, h),
              a + "kv_a_layernorm.weight": (m.kv_lora_rank,),
              a + "kv_b_proj.weight": (n * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
              a + "o_proj.weight": (h, n * m.v_head_dim)}  # fmt: skip
    if m.q_lora_rank is None:
        shapes[a + "q_proj.weight"] = (n * m.qk_head_dim, h)
    else:
        shapes.update({a + "q_a_proj.weight": (m.q_lora_rank, h), a + "q_a_layernorm.weight": (m.q_lora_rank,),
                       a + "q_b_proj.weight": (n * m.qk_head_dim, m.q_lora_rank)})  # fmt: skip
    if args.qkv_bias:
        shapes[a + "kv_a_proj_with_mqa.bias"] = (m.kv_lora_rank + m.qk_rope_head_dim,)
        if m.q_lora_rank is not None:
            shapes[a + "q_a_proj.bias"] = (m.q_lora_rank,)
    if args.o_bias:
        shapes[a + "o_proj.bias"] = (h,)
    return shapes


def _mlp_shapes(prefix: str, intermediate: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (intermediate, hidden), prefix + "up_proj.weight": (intermediate, hidden),
            prefix + "down_proj.weight": (hidden, intermediate)}  # fmt: skip
