"""Multi-head latent attention (DeepSeek-V2/V3) and its latent cache.

Per token the cache holds what keys and values are made from: the normalised ``kv_lora_rank`` latent and the one
rope key shared by all heads (``kv_lora_rank + qk_rope_head_dim`` values per layer, against
``2 x heads x head_dim`` for a plain K/V cache). Each step expands the cached latents into per-head keys and values
with ``kv_b_proj``, as transformers does (the weight-absorbed form is an optimisation left out).

Shape legend: T tokens of this step, S tokens in the cache, N heads, C kv_lora_rank, R qk_rope_head_dim,
P qk_nope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from zipmoe.runtime.config import ModelArgs
from zipmoe.runtime.ops import causal_attention, linear, rms_norm
from zipmoe.runtime.rope import Rotary

# DeepSeek's q_a_layernorm and kv_a_layernorm use RMSNorm's default epsilon, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentCache:
    """The latent and rope key of every layer for one sequence, preallocated: [L, S_max, C] and [L, S_max, R]."""

    def __init__(self, args: ModelArgs, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        mla = args.mla
        self.latent = torch.zeros((args.n_layers, max_len, mla.kv_lora_rank), device=device, dtype=dtype)
        self.rope_key = torch.zeros((args.n_layers, max_len, mla.qk_rope_head_dim), device=device, dtype=dtype)
        self.max_len = max_len

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers."""
        per_layer = self.latent.shape[-1] + self.rope_key.shape[-1]
        return self.latent.shape[0] * per_layer * self.latent.element_size()


class LatentAttention:
    """DeepSeek's MLA.

    Args:
        args: the hyper-parameters (``args.mla`` set).
        weights: dense tensors by checkpoint name.
        device: where positions are made.
    """

    def __init__(self, args: ModelArgs, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.args, self.w, self.mla = args, weights, args.mla
        self.rotary = Rotary(args.rope, self.mla.qk_rope_head_dim, self.mla.rope_layout, device)
        self.scale = args.rope.softmax_scale(self.mla.qk_head_dim)
        self._float_kv_b: dict[int, torch.Tensor] = {}  # float32 kv_b_proj weights, for BF16 on CPUs (`_expand`)

    def new_cache(self, max_len: int, device: torch.device, dtype: torch.dtype) -> LatentCache:
        return LatentCache(self.args, max_len, device, dtype)

    def __call__(self, layer: int, x: torch.Tensor, start: int, rope, cache: LatentCache) -> torch.Tensor:
        """Attention of ``x`` ([T, H], positions ``start..``) at ``layer``; ``rope``: `Rotary.tables` of them."""
        return self.output(layer, self.attend(layer, self.project(layer, x), start, rope, cache))

    def project(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per token of ``x`` [T, H]: the query's non-rotary [T, N, P] and rotary [T, N, R] parts, the normed latent
        [T, C] and the rope key [T, R] (before RoPE): row by row, so a batch is projected in one pass."""
        a, m, w = self.args, self.mla, self.w
        p = f"model.layers.{layer}.self_attn."
        t, n = x.shape[0], a.n_heads
        if m.q_lora_rank is None:
            q = linear(w, x, p + "q_proj")
        else:
            q_latent = rms_norm(
                linear(w, x, p + "q_a_proj", a.qkv_bias), w[p + "q_a_layernorm.weight"], LATENT_NORM_EPS
            )
            q = linear(w, q_latent, p + "q_b_proj")
        q_nope, q_rope = q.view(t, n, m.qk_head_dim).split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        compressed = linear(w, x, p + "kv_a_proj_with_mqa", a.qkv_bias)  # [T, C + R]
        latent, k_rope = compressed.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = rms_norm(latent, w[p + "kv_a_layernorm.weight"], LATENT_NORM_EPS)
        return q_nope, q_rope, latent, k_rope

    def attend(
        self, layer: int, projected: tuple[torch.Tensor, ...], start: int, rope, cache: LatentCache
    ) -> torch.Tensor:
        """One sequence's attention from its `project` rows (positions ``start..``), filling its cache: [T, N*Dv]."""
        a, m = self.args, self.mla
        q_nope, q_rope, latent, k_rope = projected
        t, n = latent.shape[0], a.n_heads
        q_rope = self.rotary.apply(q_rope, rope)  # [T, N, R]
        k_rope = self.rotary.apply(k_rope[:, None], rope)  # [T, 1, R]
        end = start + t
        cache.latent[layer, start:end] = latent
        cache.rope_key[layer, start:end] = k_rope[:, 0]
        kv = self._expand(layer, cache.latent[layer, :end]).view(end, n, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, values = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)  # [S, N, P], [S, N, Dv]
        k_shared = cache.rope_key[layer, :end, None].expand(end, n, m.qk_rope_head_dim).to(kv.dtype)
        keys = torch.cat((k_nope, k_shared), dim=-1)  # [S, N, P + R]
        query = torch.cat((q_nope, q_rope), dim=-1)  # [T, N, P + R]
        return causal_attention(query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), self.scale, start)

    def _expand(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Keys (non-rotary part) and values of every cached token from its latent [S, C]: [S, N*(P+Dv)].

        In float32 for BF16 on a CPU, with a float32 copy of the weight made once: oneDNN compiles and caches a BF16
        kernel for every new number of rows, and the rows grow by one each token (~1 GB of cached kernels over a
        long generation; float32 keeps no such cache). `causal_attention` computes in float32 there anyway.
        """
        name = f"model.layers.{layer}.self_attn.kv_b_proj"
        if latent.device.type != "cpu" or latent.dtype != torch.bfloat16:
            return linear(self.w, latent, name)
        weight = self._float_kv_b.get(layer)
        if weight is None:
            weight = self._float_kv_b[layer] = self.w[name + ".weight"].float()
        return torch.nn.functional.linear(latent.float(), weight)

    def output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The output projection of `attend` rows [T, N*Dv] -> [T, H] (row by row: batched like `project`)."""
        return linear(self.w, out, f"model.layers.{layer}.self_attn.o_proj", self.args.o_bias)
