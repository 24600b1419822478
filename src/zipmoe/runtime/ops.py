"""The small tensor operations every block of the runtime model shares, each as transformers' eager code computes
it (so that logits match it)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: in float32, then back to the input dtype, then scaled."""
    y = x.to(torch.float32)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def linear(weights: Mapping[str, torch.Tensor], x: torch.Tensor, name: str, bias: bool = False) -> torch.Tensor:
    """``x`` through the projection ``name`` (checkpoint names ``name.weight`` and, with ``bias``, ``name.bias``)."""
    return F.linear(x, weights[name + ".weight"], weights[name + ".bias"] if bias else None)


def causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, start: int, window: int | None = None
) -> torch.Tensor:
    """Softmax attention of the queries of positions ``start..start+T-1`` over keys ``0..S-1`` (causal, and within
    ``window`` positions when one is given); q [N, T, Dq], keys [N, S, Dq], values [N, S, Dv] -> [T, N*Dv]."""
    n, t = q.shape[:2]
    end = keys.shape[1]
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.bfloat16:
        # oneDNN compiles and caches a kernel for every new BF16 shape, and the key length grows each token: up to
        # ~1 GB of cached kernels over a long generation (float32 matmuls keep no such cache); and float32 scores are more precise
        q, keys, values = q.float(), keys.float(), values.float()
    scores = torch.matmul(q, keys.transpose(1, 2)) * scale  # [N, T, S]
    query_pos = torch.arange(start, start + t, device=q.device)[:, None]
    key_pos = torch.arange(end, device=q.device)[None, :]
    masked = key_pos > query_pos
    if window is not None:
        masked |= key_pos <= query_pos - window
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, values).transpose(0, 1).reshape(t, n * values.shape[-1])  # [T, N*Dv]
    return out.to(dtype)
