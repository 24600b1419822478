"""A small MoE transformer in plain PyTorch: Mixtral, Qwen1.5/Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3.

A decoder layer is attention (`zipmoe.runtime.attention`: grouped-query; `zipmoe.runtime.attention_mla`: DeepSeek's
latent attention, each with its own cache) then an MLP: dense, or a MoE block whose router
(`zipmoe.runtime.router`) picks the routed experts and whose shared expert, if any, is added (gated for Qwen2-MoE).
Dense weights are resident tensors; routed experts come from an `ExpertBackend` (all in memory, or a cache over a
container). The arithmetic follows transformers' eager implementations step by step (RMSNorm in float32, softmax
in float32, experts accumulated with ``index_add_`` in increasing expert order), so logits match transformers and
do not depend on the order in which experts arrive from storage.

A forward pass may hold several sequences (`Transformer.forward_batch`, driven by `zipmoe.runtime.batching`): each
is a `Segment` with its own tokens, positions, cache and routing trace. Embeddings, norms, MLPs, routers and experts
run on all their tokens at once, so each MoE layer asks its expert backend once for the whole batch; attention runs
per segment, over that segment's cache. `Transformer.forward` is the one-segment case of the same code.

Shape legend: T tokens of this step (all segments together), S segments, H hidden size, E experts, K experts per
token, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from zipmoe.runtime.attention import GroupedQueryAttention, KVCache
from zipmoe.runtime.attention_mla import LatentAttention, LatentCache
from zipmoe.runtime.config import ModelArgs
from zipmoe.runtime.ops import mlp, rms_norm
from zipmoe.runtime.router import choose_experts, order_by_score, router_scores, routing_weights
from zipmoe.runtime.shapes import correction_bias_name, router_name

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


class Segment(NamedTuple):
    """One sequence's part of a forward pass: ``tokens`` ([T_i]) at positions ``start..start+T_i-1``, the cache they
    extend, and the routing trace they follow (None: the model's `Transformer.replay`, which may be None: the
    router)."""

    tokens: torch.Tensor
    start: int
    cache: KVCache | LatentCache
    replay: RoutingReplay | None = None


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
        self.router_names = [router_name(args, i, weights) for i in range(args.n_layers)]
        self.moe_position = {
            layer: i for i, layer in enumerate(n for n in range(args.n_layers) if args.sparse_layers[n])
        }
        # experts from a routing trace instead of the router, for segments that bring no trace of their own
        self.replay: RoutingReplay | None = None
        self.recorder: RoutingRecorder | None = None  # sees every MoE layer's choices (all segments, in order)

    def new_cache(self, max_len: int) -> KVCache | LatentCache:
        return self.attention.new_cache(max_len, self.device, self.dtype)

    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes of attention cache one token of a sequence takes (all layers)."""
        return self.new_cache(1).bytes_per_token

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start: int,
        cache: KVCache | LatentCache,
        *,
        all_logits: bool = False,
        replay: RoutingReplay | None = None,
    ) -> torch.Tensor:
        """Run ``tokens`` ([T], positions ``start..start+T-1``) through the model, filling the cache; ``replay``:
        the routing trace they follow (None: `replay`). The one-segment case of `forward_batch`.

        Returns the logits of the last token ([V], float32), or of every token ([T, V]) with ``all_logits``.

        Raises:
            ValueError: the tokens do not fit in the cache.
        """
        segment = Segment(tokens, start, cache, replay)
        if all_logits:
            return self._logits(self._hidden([segment]))
        return self._logits(self._hidden([segment])[-1:])[0]

    @torch.inference_mode()
    def forward_batch(self, segments: Sequence[Segment | tuple]) -> torch.Tensor:
        """Run several sequences' tokens through the model in one pass, each segment filling its own cache.

        Args:
            segments: `Segment` s (or tuples ``(tokens, start, cache[, replay])``), at least one, each of at least one
                token.

        Returns:
            The logits of each segment's last token, [S, V] float32.

        Raises:
            ValueError: no segments, an empty segment, or tokens that do not fit in their cache.
        """
        parts = [Segment(*segment) for segment in segments]
        if not parts:
            raise ValueError("a forward pass needs at least one segment")
        h = self._hidden(parts)  # [T, H]
        ends = torch.tensor(_offsets(parts)[1:], device=h.device) - 1  # each segment's last token
        return self._logits(h[ends])

    def _hidden(self, segments: list[Segment]) -> torch.Tensor:
        """The last layer's hidden states of every token of ``segments`` ([T, H]), filling their caches."""
        a = self.args
        for s in segments:
            t = s.tokens.shape[0]
            if t < 1:
                raise ValueError("a segment of a forward pass has no tokens")
            if s.start + t > s.cache.max_len:
                raise ValueError(f"sequence of {s.start + t} tokens exceeds the cache of {s.cache.max_len}")
        tokens = segments[0].tokens if len(segments) == 1 else torch.cat([s.tokens for s in segments])
        ropes = [  # rotary tables per segment: its own positions
            self.attention.rotary.tables(
                torch.arange(s.start, s.start + s.tokens.shape[0], device=self.device), self.dtype
            )
            for s in segments
        ]
        h = F.embedding(tokens, self.embed)  # [T, H]
        for layer in range(a.n_layers):
            p = f"model.layers.{layer}."
            h = h + self._attention(layer, self._norm(h, p + "input_layernorm.weight"), segments, ropes)
            m = self._norm(h, p + "post_attention_layernorm.weight")
            h = h + (self._moe(layer, m, segments) if a.sparse_layers[layer] else self._dense_mlp(p + "mlp.", m))
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head of hidden states [N, H]: [N, V] float32."""
        return F.linear(self._norm(h, "model.norm.weight"), self.lm_head).float()

    def _attention(self, layer: int, x: torch.Tensor, segments: list[Segment], ropes: list) -> torch.Tensor:
        """Attention of every segment over its own cache and positions; x [T, H] -> [T, H]. The projections run
        once over all tokens; RoPE, the cache and the attention itself per segment."""
        attention = self.attention
        projected = attention.project(layer, x)
        if len(segments) == 1:
            out = attention.attend(layer, projected, segments[0].start, ropes[0], segments[0].cache)
        else:
            bounds = _offsets(segments)
            out = torch.cat(
                [
                    attention.attend(layer, tuple(t[lo:hi] for t in projected), s.start, rope, s.cache)
                    for s, rope, lo, hi in zip(segments, ropes, bounds, bounds[1:])
                ]
            )
        return attention.output(layer, out)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm(x, self.w[name], self.args.rms_eps)

    def _dense_mlp(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        return mlp(x, w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"], w[prefix + "down_proj.weight"])

    def _moe(self, layer: int, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        a = self.args
        scores = router_scores(a.router, x, self.w[self.router_names[layer]])  # [T, E] float32
        position = self.moe_position[layer]
        top_index = self._choose(layer, position, scores, segments)  # [T, K]
        if self.recorder is not None:
            self.recorder.record(position, top_index.cpu().numpy())
        top_weight, top_prob = routing_weights(a.router, scores, top_index, a.norm_topk_prob, x.dtype)
        out = self.experts.run(layer, x, top_index, top_weight, top_prob)  # once for every segment's tokens
        if a.shared_expert_intermediate:
            p = f"model.layers.{layer}.mlp."
            if a.shared_expert_gated:  # Qwen2-MoE: one shared expert behind a sigmoid gate
                shared = self._dense_mlp(p + "shared_expert.", x)
                out = out + torch.sigmoid(F.linear(x, self.w[p + "shared_expert_gate.weight"])) * shared
            else:  # DeepSeek: its n_shared_experts as one MLP, always added
                out = out + self._dense_mlp(p + "shared_experts.", x)
        return out

    def _choose(self, layer: int, position: int, scores: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """Each token's experts [T, K]: the router's, or for a segment that follows a routing trace (its own, else
        `replay`) the trace's experts in decreasing router score."""
        a = self.args
        replays = [self.replay if s.replay is None else s.replay for s in segments]
        routed = None
        if any(replay is None for replay in replays):
            router = self.router_names[layer]
            bias = self.w[correction_bias_name(router)] if a.router.correction_bias else None
            routed = choose_experts(a.router, scores, a.top_k, bias)
        if all(replay is None for replay in replays):
            return routed
        parts = []
        bounds = _offsets(segments)
        for s, replay, lo, hi in zip(segments, replays, bounds, bounds[1:]):
            if replay is None:
                parts.append(routed[lo:hi])
            else:
                chosen = torch.as_tensor(replay.choices(position, s.start, hi - lo), device=scores.device)
                parts.append(order_by_score(scores[lo:hi], chosen.long()))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _offsets(segments: list[Segment]) -> list[int]:
    """Where each segment's tokens start in the concatenation, and where the last ends: S + 1 offsets."""
    offsets = [0]
    for s in segments:
        offsets.append(offsets[-1] + s.tokens.shape[0])
    return offsets
