"""A small MoE transformer in plain PyTorch: Mixtral, Qwen1.5/Qwen2-MoE, Qwen3-MoE, OLMoE.

Dense weights are resident tensors; routed experts come from an `ExpertBackend` (all in memory, or a cache over a
container). The arithmetic follows transformers' eager implementations step by step (RMSNorm in float32, softmax
in float32, experts accumulated with ``index_add_`` in increasing expert order), so logits match transformers and
do not depend on the order in which experts arrive from storage.

Shape legend: T tokens of this step, S tokens in the KV cache, H hidden size, E experts, K experts per token,
N attention heads, G key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from zipmoe.runtime.config import ModelArgs


@dataclass
class ExpertWeights:
    """One routed expert, ready for compute: ``down(silu(gate(x)) * up(x))``."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


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


class KVCache:
    """Keys and values of every layer for one sequence, preallocated: [L, S_max, G, D]."""

    def __init__(self, args: ModelArgs, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (args.n_layers, max_len, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len


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
        half = torch.arange(0, args.head_dim, 2, dtype=torch.float32, device=self.device) / args.head_dim
        self.inv_freq = 1.0 / (args.rope_theta**half)
        self.router_names = [router_name(weights, i) for i in range(args.n_layers)]
        self.moe_position = {
            layer: i for i, layer in enumerate(n for n in range(args.n_layers) if args.sparse_layers[n])
        }
        self.replay: RoutingReplay | None = None  # experts from a routing trace instead of the router
        self.recorder: RoutingRecorder | None = None  # sees every MoE layer's choices
        self._start = 0

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.args, max_len, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Run ``tokens`` ([T], positions ``start..start+T-1``) through the model, filling the cache.

        Returns the logits of the last token ([V], float32), or of every token ([T, V]) with ``all_logits``.
        """
        a = self.args
        t = tokens.shape[0]
        if start + t > cache.max_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the cache of {cache.max_len}")
        positions = torch.arange(start, start + t, device=self.device)
        freqs = positions[:, None].float() * self.inv_freq  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)  # [T, D]
        h = F.embedding(tokens, self.embed)  # [T, H]
        self._start = start
        for layer in range(a.n_layers):
            p = f"model.layers.{layer}."
            h = h + self._attention(layer, self._norm(h, p + "input_layernorm.weight"), start, cos, sin, cache)
            m = self._norm(h, p + "post_attention_layernorm.weight")
            h = h + (self._moe(layer, m) if a.sparse_layers[layer] else self._dense_mlp(p + "mlp.", m))
        h = self._norm(h if all_logits else h[-1:], "model.norm.weight")
        logits = F.linear(h, self.lm_head).float()
        return logits if all_logits else logits[0]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm(x, self.w[name], self.args.rms_eps)

    def _linear(self, x: torch.Tensor, name: str, bias: bool = False) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"] if bias else None)

    def _attention(
        self, layer: int, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        a = self.args
        p = f"model.layers.{layer}.self_attn."
        t = x.shape[0]
        q = self._linear(x, p + "q_proj", a.qkv_bias)  # [T, N*D]
        k = self._linear(x, p + "k_proj", a.qkv_bias)  # [T, G*D]
        v = self._linear(x, p + "v_proj", a.qkv_bias)
        if a.qk_norm == "full":
            q, k = self._norm(q, p + "q_norm.weight"), self._norm(k, p + "k_norm.weight")
        if a.clip_qkv is not None:
            q, k, v = (y.clamp(-a.clip_qkv, a.clip_qkv) for y in (q, k, v))
        q = q.view(t, a.n_heads, a.head_dim)
        k = k.view(t, a.n_kv_heads, a.head_dim)
        v = v.view(t, a.n_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = self._norm(q, p + "q_norm.weight"), self._norm(k, p + "k_norm.weight")
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        end = start + t
        cache.k[layer, start:end] = k
        cache.v[layer, start:end] = v
        keys = cache.k[layer, :end].transpose(0, 1)  # [G, S, D]
        values = cache.v[layer, :end].transpose(0, 1)
        groups = a.n_heads // a.n_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=0)  # [N, S, D]
            values = values.repeat_interleave(groups, dim=0)
        scores = torch.matmul(q.transpose(0, 1), keys.transpose(1, 2)) * a.head_dim**-0.5  # [N, T, S]
        query_pos = torch.arange(start, end, device=self.device)[:, None]
        key_pos = torch.arange(end, device=self.device)[None, :]
        masked = key_pos > query_pos
        window = a.sliding_window[layer]
        if window is not None:
            masked |= key_pos <= query_pos - window
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, values).transpose(0, 1).reshape(t, a.n_heads * a.head_dim)  # [T, N*D]
        return self._linear(out, p + "o_proj", a.o_bias)

    def _dense_mlp(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        return mlp(x, w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"], w[prefix + "down_proj.weight"])

    def _moe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        logits = F.linear(x, self.w[self.router_names[layer]])  # [T, E]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        position = self.moe_position[layer]
        if self.replay is not None:  # the trace's experts, in decreasing router probability
            chosen = torch.as_tensor(self.replay.choices(position, self._start, x.shape[0]), device=x.device)
            top_weight, order = torch.sort(probs.gather(1, chosen.long()), dim=-1, descending=True)
            top_index = chosen.long().gather(1, order)
        else:
            top_weight, top_index = torch.topk(probs, a.top_k, dim=-1)  # [T, K]
        if self.recorder is not None:
            self.recorder.record(position, top_index.cpu().numpy())
        top_prob = top_weight
        if a.norm_topk_prob:
            top_weight = top_weight / top_weight.sum(dim=-1, keepdim=True)
        if a.family != "mixtral":  # Mixtral keeps the routing weights in float32
            top_weight = top_weight.to(x.dtype)
        out = self.experts.run(layer, x, top_index, top_weight, top_prob)
        if a.shared_expert_intermediate:
            p = f"model.layers.{layer}.mlp."
            shared = self._dense_mlp(p + "shared_expert.", x)
            out = out + torch.sigmoid(F.linear(x, self.w[p + "shared_expert_gate.weight"])) * shared
        return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: in float32, then back to the input dtype, then scaled."""
    y = x.to(torch.float32)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def router_name(names: Collection[str], layer: int) -> str:
    """The router weight of MoE layer ``layer`` among tensor ``names``: ``mlp.gate`` or ``block_sparse_moe.gate``."""
    for block in ("mlp", "block_sparse_moe"):
        name = f"model.layers.{layer}.{block}.gate.weight"
        if name in names:
            return name
    return f"model.layers.{layer}.mlp.gate.weight"  # dense layers have none; only looked up for MoE layers
