"""A small MoE transformer in plain PyTorch: Mixtral, Qwen1.5/Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3.

A decoder layer is attention (`zipmoe.runtime.attention`: grouped-query; `zipmoe.runtime.attention_mla`: DeepSeek's
latent attention, each with its own cache) then an MLP: dense, or a MoE block whose router
(`zipmoe.runtime.router`) picks the routed experts and whose shared expert, if any, is added (gated for Qwen2-MoE).
Dense weights are resident tensors; routed experts come from an `ExpertBackend` (all in memory, or a cache over a
container). The arithmetic follows transformers' eager implementations step by step (RMSNorm in float32, softmax
in float32, experts accumulated with ``index_add_`` in increasing expert order), so logits match transformers and
do not depend on the order in which experts arrive from storage.

Shape legend: T tokens of this step, H hidden size, E experts, K experts per token, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from zipmoe.runtime.attention import GroupedQueryAttention, KVCache
from zipmoe.runtime.attention_mla import LatentAttention, LatentCache
from zipmoe.runtime.config import ModelArgs
from zipmoe.runtime.ops import mlp, rms_norm
from zipmoe.runtime.router import choose_experts, order_by_score, router_scores, routing_weights

# KVCache, mlp and rms_norm moved to their own modules; they stay importable from here.


@dataclass
class ExpertWeights:
    """One routed expert, ready for compute: ``down(silu(gate(x)) * up(x))``."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


class ExpertBackend(Protocol):
    """Runs the routed experts of one MoE layer."""

    def run(
        self,
        layer: int,
        x: torch.Tensor,
        top_index: torch.Tensor,
        top_weight: torch.Tensor,
        top_prob: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum over each token's K experts of weight * expert(x); x [T, H], top_index/top_weight [T, K] -> [T, H].

        ``top_prob`` are the chosen experts' raw router probabilities (before any renormalisation), float32.
        """
        ...

    def on_phase(self, phase: str) -> None:
        """Told by the generation loop when the ``prefill`` and when the ``decode`` phase starts."""
        ...


def expert_assignments(top_index: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, token positions, slot in the top-k) for every expert some token chose, in increasing expert order."""
    flat = top_index.flatten()
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    k = top_index.shape[1]
    out = []
    for expert, chunk in zip(experts.tolist(), torch.split(order, counts.tolist())):
        out.append((expert, chunk // k, chunk % k))
    return out


def expert_output(
    x: torch.Tensor, weights: ExpertWeights, tokens: torch.Tensor, slots: torch.Tensor, top_weight: torch.Tensor
) -> torch.Tensor:
    """One expert's contribution for its tokens, already multiplied by their routing weights; [len(tokens), H]."""
    y = mlp(x[tokens], weights.gate, weights.up, weights.down)
    return y * top_weight[tokens, slots, None]


def accumulate(x: torch.Tensor, outputs: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum expert outputs {expert: (tokens, output)} in increasing expert order (the order fixes the rounding)."""
    total = torch.zeros_like(x)
    for expert in sorted(outputs):
        tokens, y = outputs[expert]
        total.index_add_(0, tokens, y.to(total.dtype))
    return total


class InMemoryExperts:
    """Every expert decoded and resident: the upper bound the caches are measured against."""

    def __init__(self, experts: Mapping[tuple[int, int], ExpertWeights]) -> None:
        self.experts = experts

    def on_phase(self, phase: str) -> None:
        pass

    def run(self, layer: int, x: torch.Tensor, top_index, top_weight, top_prob=None) -> torch.Tensor:
        outputs = {
            e: (tokens, expert_output(x, self.experts[(layer, e)], tokens, slots, top_weight))
            for e, tokens, slots in expert_assignments(top_index)
        }
        return accumulate(x, outputs)


class RoutingReplay(Protocol):
    """Experts named by a routing trace instead of the router's choice (`zipmoe.runtime.routing.RoutingReplay`)."""

    def choices(self, layer_position: int, start: int, count: int) -> np.ndarray:
        """The experts of tokens ``start..start+count-1`` at the ``layer_position``-th MoE layer: [count, K]."""
        ...


class RoutingRecorder(Protocol):
    """Receives every MoE layer's choices (`zipmoe.runtime.routing.RoutingRecorder`)."""

    def record(self, layer_position: int, top_index: np.ndarray) -> None: ...


class Transformer:
    """The model: resident dense weights plus an expert backend.

    Args:
        args: the hyper-parameters.
        weights: dense tensors by their checkpoint name, already on the device in the compute dtype.
        experts: where routed experts come from.
    """

    def __init__(self, args: ModelArgs, weights: Mapping[str, torch.Tensor], experts: ExpertBackend) -> None:
        self.args = args
        self.w = weights
        self.experts = experts
        self.embed = weights["model.embed_tokens.weight"]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.lm_head = weights["model.embed_tokens.weight"] if args.tie_embeddings else weights["lm_head.weight"]
        kind = LatentAttention if args.mla is not None else GroupedQueryAttention
        self.attention: GroupedQueryAttention | LatentAttention = kind(args, weights, self.device)
        self.router_names = [router_name(weights, i) for i in range(args.n_layers)]
        self.moe_position = {
            layer: i for i, layer in enumerate(n for n in range(args.n_layers) if args.sparse_layers[n])
        }
        self.replay: RoutingReplay | None = None  # experts from a routing trace instead of the router
        self.recorder: RoutingRecorder | None = None  # sees every MoE layer's choices
        self._start = 0

    def new_cache(self, max_len: int) -> KVCache | LatentCache:
        return self.attention.new_cache(max_len, self.device, self.dtype)

    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes of attention cache one token of a sequence takes (all layers)."""
        return self.new_cache(1).bytes_per_token

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, start: int, cache: KVCache | LatentCache, *, all_logits: bool = False
    ) -> torch.Tensor:
        """Run ``tokens`` ([T], positions ``start..start+T-1``) through the model, filling the cache.

        Returns the logits of the last token ([V], float32), or of every token ([T, V]) with ``all_logits``.
        """
        a = self.args
        t = tokens.shape[0]
        if start + t > cache.max_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the cache of {cache.max_len}")
        positions = torch.arange(start, start + t, device=self.device)
        rope = self.attention.rotary.tables(positions, self.dtype)
        h = F.embedding(tokens, self.embed)  # [T, H]
        self._start = start
        for layer in range(a.n_layers):
            p = f"model.layers.{layer}."
            h = h + self.attention(layer, self._norm(h, p + "input_layernorm.weight"), start, rope, cache)
            m = self._norm(h, p + "post_attention_layernorm.weight")
            h = h + (self._moe(layer, m) if a.sparse_layers[layer] else self._dense_mlp(p + "mlp.", m))
        h = self._norm(h if all_logits else h[-1:], "model.norm.weight")
        logits = F.linear(h, self.lm_head).float()
        return logits if all_logits else logits[0]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm(x, self.w[name], self.args.rms_eps)

    def _dense_mlp(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        return mlp(x, w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"], w[prefix + "down_proj.weight"])

    def _moe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        router = self.router_names[layer]
        scores = router_scores(a.router, x, self.w[router])  # [T, E] float32
        position = self.moe_position[layer]
        if self.replay is not None:  # the trace's experts, in decreasing router score
            chosen = torch.as_tensor(self.replay.choices(position, self._start, x.shape[0]), device=x.device)
            top_index = order_by_score(scores, chosen.long())
        else:
            bias = self.w[correction_bias_name(router)] if a.router.correction_bias else None
            top_index = choose_experts(a.router, scores, a.top_k, bias)  # [T, K]
        if self.recorder is not None:
            self.recorder.record(position, top_index.cpu().numpy())
        top_weight, top_prob = routing_weights(a.router, scores, top_index, a.norm_topk_prob, x.dtype)
        out = self.experts.run(layer, x, top_index, top_weight, top_prob)
        if a.shared_expert_intermediate:
            p = f"model.layers.{layer}.mlp."
            if a.shared_expert_gated:  # Qwen2-MoE: one shared expert behind a sigmoid gate
                shared = self._dense_mlp(p + "shared_expert.", x)
                out = out + torch.sigmoid(F.linear(x, self.w[p + "shared_expert_gate.weight"])) * shared
            else:  # DeepSeek: its n_shared_experts as one MLP, always added
                out = out + self._dense_mlp(p + "shared_experts.", x)
        return out


def correction_bias_name(router: str) -> str:
    """DeepSeek-V3's ``e_score_correction_bias`` beside the router weight named ``router``."""
    return router.removesuffix("weight") + "e_score_correction_bias"


def router_name(names: Collection[str], layer: int) -> str:
    """The router weight of MoE layer ``layer`` among tensor ``names``: ``mlp.gate`` or ``block_sparse_moe.gate``."""
    for block in ("mlp", "block_sparse_moe"):
        name = f"model.layers.{layer}.{block}.gate.weight"
        if name in names:
            return name
    return f"model.layers.{layer}.mlp.gate.weight"  # dense layers have none; only looked up for MoE layers
