"""Grouped-query attention (Mixtral, Qwen2/3-MoE, OLMoE) and its key/value cache.

Shape legend: T tokens of this step, S tokens in the cache, N attention heads, G key/value heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from zipmoe.runtime.config import ModelArgs
from zipmoe.runtime.ops import causal_attention, linear, rms_norm
from zipmoe.runtime.rope import Rotary


class KVCache:
    """Keys and values of every layer for one sequence, preallocated: [L, S_max, G, D]."""

    def __init__(self, args: ModelArgs, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (args.n_layers, max_len, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()


class GroupedQueryAttention:
    """Attention with G key/value heads shared by groups of the N query heads.

    Args:
        args: the hyper-parameters.
        weights: dense tensors by checkpoint name.
        device: where positions are made.
    """

    def __init__(self, args: ModelArgs, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.args, self.w = args, weights
        self.rotary = Rotary(args.rope, args.head_dim, "half", device)

    def new_cache(self, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache(self.args, max_len, device, dtype)

    def __call__(self, layer: int, x: torch.Tensor, start: int, rope, cache: KVCache) -> torch.Tensor:
        """Attention of ``x`` ([T, H], positions ``start..``) at ``layer``; ``rope``: `Rotary.tables` of them."""
        return self.output(layer, self.attend(layer, self.project(layer, x), start, rope, cache))

    def project(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries [T, N, D], keys and values [T, G, D] of ``x`` [T, H] (normed and clipped, before RoPE): row by
        row, so a batch of sequences is projected in one pass and sliced per sequence for `attend`."""
        a, w = self.args, self.w
        p = f"model.layers.{layer}.self_attn."
        t = x.shape[0]
        q = linear(w, x, p + "q_proj", a.qkv_bias)  # [T, N*D]
        k = linear(w, x, p + "k_proj", a.qkv_bias)  # [T, G*D]
        v = linear(w, x, p + "v_proj", a.qkv_bias)
        if a.qk_norm == "full":
            q, k = rms_norm(q, w[p + "q_norm.weight"], a.rms_eps), rms_norm(k, w[p + "k_norm.weight"], a.rms_eps)
        if a.clip_qkv is not None:
            q, k, v = (y.clamp(-a.clip_qkv, a.clip_qkv) for y in (q, k, v))
        q = q.view(t, a.n_heads, a.head_dim)
        k = k.view(t, a.n_kv_heads, a.head_dim)
        v = v.view(t, a.n_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = rms_norm(q, w[p + "q_norm.weight"], a.rms_eps), rms_norm(k, w[p + "k_norm.weight"], a.rms_eps)
        return q, k, v

    def attend(self, layer: int, projected: tuple[torch.Tensor, ...], start: int, rope, cache: KVCache) -> torch.Tensor:
        """One sequence's attention from its `project` rows (positions ``start..``), filling its cache: [T, N*D]."""
        a = self.args
        q, k, v = projected
        t = q.shape[0]
        q, k = self.rotary.apply(q, rope), self.rotary.apply(k, rope)
        end = start + t
        cache.k[layer, start:end] = k
        cache.v[layer, start:end] = v
        keys = cache.k[layer, :end].transpose(0, 1)  # [G, S, D]
        values = cache.v[layer, :end].transpose(0, 1)
        groups = a.n_heads // a.n_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=0)  # [N, S, D]
            values = values.repeat_interleave(groups, dim=0)
        return causal_attention(q.transpose(0, 1), keys, values, a.head_dim**-0.5, start, a.sliding_window[layer])

    def output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The output projection of `attend` rows [T, N*D] -> [T, H] (row by row: batched like `project`)."""
        return linear(self.w, out, f"model.layers.{layer}.self_attn.o_proj", self.args.o_bias)
