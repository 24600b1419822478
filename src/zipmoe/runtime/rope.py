"""Rotary position embeddings: frequencies (plain RoPE, YaRN) and the three ways checkpoints lay rotated pairs out.

* ``half``: feature i pairs with feature i + D/2 (Llama, Mixtral, Qwen, OLMoE; DeepSeek-V3 with
  ``rope_interleave: false``);
* ``interleaved``: features 2i and 2i+1 pair, and the rotated pairs come out as all first halves then all second
  halves (DeepSeek-V3, as transformers computes it);
* ``complex``: features 2i and 2i+1 pair as one complex number, rotated in float32, and stay interleaved
  (DeepSeek-V2).

Attention scores depend only on the dot products of rotated queries and keys, so ``interleaved`` and ``complex``
give the same attention up to rounding; each follows its transformers implementation.
"""

from __future__ import annotations

import math

import torch

from zipmoe.runtime.rope_config import RopeArgs

LAYOUTS = ("half", "interleaved", "complex")


def inverse_frequencies(rope: RopeArgs, dim: int, device: torch.device) -> torch.Tensor:
    """The rotation frequency of each of the ``dim / 2`` feature pairs ([D/2], float32), YaRN's blend of
    interpolated and extrapolated frequencies when ``rope.rope_type == "yarn"``."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    if rope.rope_type == "default":
        return 1.0 / (rope.theta**exponents)
    pos_freqs = rope.theta**exponents
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    low, high = _correction_range(rope, dim)
    if low == high:
        high += 0.001  # prevents a division by zero, as transformers does
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def _correction_range(rope: RopeArgs, dim: int) -> tuple[float, float]:
    """The pair indices between which YaRN blends from extrapolation (fast) to interpolation (slow rotations)."""

    def pair_index(rotations: float) -> float:
        return (dim * math.log(rope.original_context / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = pair_index(rope.beta_fast), pair_index(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


class Rotary:
    """Rotates queries and keys by position.

    Args:
        rope: the frequencies' parameters.
        dim: features rotated per head.
        layout: how rotated pairs are laid out (`LAYOUTS`).
        device: where the tables are made.
    """

    def __init__(self, rope: RopeArgs, dim: int, layout: str, device: torch.device) -> None:
        self.inv_freq = inverse_frequencies(rope, dim, device)
        self.scale = rope.cos_sin_scale
        self.layout = layout

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """What `apply` needs for ``positions`` ([T]): cos and sin [T, D] in ``dtype``, or ``complex`` rotations."""
        freqs = positions[:, None].float() * self.inv_freq  # [T, D/2]
        if self.layout == "complex":
            return torch.polar(torch.ones_like(freqs), freqs) * self.scale
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def apply(self, x: torch.Tensor, tables) -> torch.Tensor:
        """``x`` [T, heads, D] rotated by the positions ``tables`` were made for."""
        if self.layout == "complex":
            pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(pairs * tables[:, None]).flatten(-2).type_as(x)
        cos, sin = tables[0][:, None], tables[1][:, None]
        if self.layout == "interleaved":
            half = cos.shape[-1] // 2
            cos, sin = cos[..., :half], sin[..., :half]
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
