"""Hyper-parameters of the runtime's pluggable blocks: the router and multi-head latent attention.

`zipmoe.runtime.config.ModelArgs` holds one of each; the family mappings fill them in. This module does not import
torch.
"""

from __future__ import annotations

from dataclasses import dataclass

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class RouterArgs:
    """How a MoE layer picks its experts and weighs them (`zipmoe.runtime.router`).

    * ``softmax`` scores, ``greedy``: the top-k scores (Mixtral, Qwen, OLMoE, DeepSeek-V2).
    * ``group_limited_greedy`` (DeepSeek-V2): experts split into ``n_group`` groups, a group scored by its best
      expert; the top-k among the ``topk_group`` best groups.
    * ``sigmoid`` scores, ``noaux_tc`` (DeepSeek-V3): experts are *chosen* by score + ``e_score_correction_bias``,
      groups by the sum of their two best biased scores; the *weights* are the unbiased scores.
    """

    scoring: str = "softmax"
    method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0  # routed_scaling_factor: multiplies the weights (after any renormalisation)
    float32_logits: bool = False  # DeepSeek: router logits from float32 hidden states and weights
    float32_weights: bool = False  # the weights stay float32 (Mixtral, DeepSeek), else the compute dtype
    renorm_epsilon: float = 0.0  # DeepSeek adds 1e-20 to the sum it renormalises by

    @property
    def correction_bias(self) -> bool:
        """Whether the router has an ``e_score_correction_bias`` tensor."""
        return self.method == "noaux_tc"


@dataclass(frozen=True)
class MlaArgs:
    """Multi-head latent attention (DeepSeek-V2/V3): queries from ``q_lora_rank`` (None: a plain projection), keys
    and values expanded from a ``kv_lora_rank`` latent that, with one shared rope key, is all the cache holds."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_layout: str  # "complex" (V2: interleaved pairs, interleaved out), "interleaved" (V3), or "half"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer: the latent and the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim
