"""Which experts each token of a MoE layer uses, and with what weights (`zipmoe.runtime.block_args.RouterArgs`).

Computed as transformers does for each family: scores in float32, experts chosen by the top-k of (possibly
group-masked, possibly bias-corrected) scores, the weights gathered from the unbiased scores, optionally
renormalised, then scaled. The chosen experts are returned in decreasing order of the score they were chosen by.

Shape legend: T tokens, E experts, K experts per token, G groups of experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zipmoe.runtime.block_args import RouterArgs


def router_scores(router: RouterArgs, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each token's score for each expert, float32 [T, E]: softmax probabilities, or sigmoids (DeepSeek-V3)."""
    logits = F.linear(x.float(), weight.float()) if router.float32_logits else F.linear(x, weight)  # [T, E]
    if router.scoring == "sigmoid":
        return logits.float().sigmoid()
    return F.softmax(logits, dim=-1, dtype=torch.float32)


def choose_experts(
    router: RouterArgs, scores: torch.Tensor, top_k: int, correction_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``top_k`` experts of each token [T, K] (int64), best first.

    ``correction_bias`` ([E], DeepSeek-V3's ``e_score_correction_bias``) is added to the scores for the choice
    only; the weights (`routing_weights`) come from the scores themselves.
    """
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if router.method == "greedy" or router.n_group == 1 and router.method == "group_limited_greedy":
        return torch.topk(choice, top_k, dim=-1)[1]
    t, e = choice.shape
    grouped = choice.view(t, router.n_group, e // router.n_group)  # [T, G, E/G]
    if router.method == "group_limited_greedy":  # a group scores by its best expert
        group_scores, fill = grouped.max(dim=-1).values, 0.0
    else:  # noaux_tc: by the sum of its two best
        group_scores, fill = grouped.topk(2, dim=-1)[0].sum(dim=-1), float("-inf")
    group_index = torch.topk(group_scores, router.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_index, 1).bool()  # [T, G]
    expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(t, e)
    return torch.topk(choice.masked_fill(~expert_mask, fill), top_k, dim=-1)[1]


def routing_weights(
    router: RouterArgs, scores: torch.Tensor, top_index: torch.Tensor, normalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the chosen experts [T, K] (float32 or ``dtype``, see `RouterArgs.float32_weights`) and their
    raw scores (float32), from ``scores`` and ``top_index``: renormalised to sum to one with ``normalize``, then
    multiplied by the routed scaling factor."""
    top_prob = scores.gather(1, top_index)
    weights = top_prob
    if normalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total + router.renorm_epsilon if router.renorm_epsilon else total)
    if router.scaling != 1.0:
        weights = weights * router.scaling
    return (weights if router.float32_weights else weights.to(dtype)), top_prob


def order_by_score(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Given experts [T, K] (a routing trace's), the same experts in decreasing order of their scores."""
    order = torch.sort(scores.gather(1, experts), dim=-1, descending=True)[1]
    return experts.gather(1, order)
