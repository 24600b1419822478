"""Dequantization of AMAT slices with torch tensor operations: the path for slices held on a GPU.

The same float32 arithmetic as the Numba kernel (`zipmoe.quant.kernels.dequantize_slices`), so on any device it
gives the same bits before the final cast to the compute dtype.
"""

from __future__ import annotations

import torch

from zipmoe.quant.spec import Precision, SliceSpec


def unpack(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Values (int32) from bytes packed eight values to ``width`` bytes, value i at bits ``width*i``."""
    blocks = packed.view(-1, width).to(torch.int64)
    acc = torch.zeros(blocks.shape[0], dtype=torch.int64, device=packed.device)
    for k in range(width):
        acc |= blocks[:, k] << (8 * k)
    shifts = torch.arange(0, 8 * width, width, device=packed.device, dtype=torch.int64)
    return ((acc[:, None] >> shifts) & ((1 << width) - 1)).to(torch.int32).view(-1)


def dequantize(
    msb: torch.Tensor,
    lsb: torch.Tensor | None,
    rows: int,
    cols: int,
    spec: SliceSpec,
    precision: Precision,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``[rows, cols]`` weights in ``dtype`` from an MSB slice payload (uint8) and, for high precision, the LSB one."""
    n = rows * cols
    groups = n // spec.group_size
    packed_nbytes = n * spec.low_bits // 8
    q = unpack(msb[:packed_nbytes], spec.low_bits)
    scale = msb[packed_nbytes : packed_nbytes + 2 * groups].view(torch.bfloat16).to(torch.float32)
    zp = msb[packed_nbytes + 2 * groups :].to(torch.int32)
    if precision == Precision.HIGH:
        if spec.shift:
            q = (q << spec.shift) | unpack(lsb, spec.shift)
    else:
        scale = scale * float(1 << spec.shift)
        if precision == Precision.LOW:
            zp = zp >> spec.shift
    w = (q.view(groups, spec.group_size) - zp[:, None]).to(torch.float32) * scale[:, None]
    return w.view(rows, cols).to(dtype)
