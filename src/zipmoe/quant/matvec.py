"""Products with weights straight from their AMAT slices, for the few tokens an expert sees while decoding.

Dequantizing an expert to float32 and then multiplying writes and reads four bytes per weight; for one token that
costs more than the product itself. `matmul_slices` dequantizes one row at a time into a buffer that stays in the
L1 cache and multiplies it with each token there, so the weights cross memory once, packed. The weights are exactly
those of `dequantize_slices`; the products equal ``x @ W.T`` up to float32 rounding (the sums run in another order).
4-bit MSB values, and 8-bit values made of 4-bit MSB and LSB slices (MAT(8,4)), take loops over packed bytes that
LLVM vectorizes; other widths unpack each row first.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint8

from zipmoe._threads import Workers
from zipmoe.quant.amat import min_rows, slice_parts
from zipmoe.quant.kernels import _unpack
from zipmoe.quant.spec import Precision, SliceSpec

# Reassociation lets LLVM vectorize the dot products; the result is not bit-exact anyway (see above).
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(nogil=True, cache=True)
def _row_groups(scales, zero_points, at, zp_shift, scale_bits, zp):  # pragma: no cover - compiled
    """One row's scales (into ``scale_bits``, read through its float32 view) and zero-points, as float32."""
    for g in range(zp.size):
        scale_bits[g] = np.uint32(scales[at + g]) << np.uint32(16)
        zp[g] = np.float32(np.int32(zero_points[at + g]) >> zp_shift)


@njit(nogil=True, cache=True, fastmath=_FAST)
def matvec_slices(
    msb_packed, lsb_packed, scales, zero_points, cols, group, high_bits, low_bits, mode, x, first_row, last_row, out
):  # pragma: no cover - compiled
    """``out[t, r] = sum_j w[r, j] * x[t, j]`` for rows ``first_row..last_row-1``; ``x`` is float32 ``[T, cols]``.

    ``w`` are the weights `dequantize_slices` makes with the same arguments (``mode`` a `Precision`). Each row is
    dequantized once into a small buffer that stays in the L1 cache, then multiplied with every token.
    """
    shift = high_bits - low_bits
    groups = cols // group
    n_tok = x.shape[0]
    factor = np.float32(1.0) if mode == 0 else np.float32(1 << shift)
    zp_shift = shift if mode == 1 else 0
    with_lsb = mode == 0 and shift > 0
    scale_bits = np.empty(groups, np.uint32)
    scale = scale_bits.view(np.float32)
    zp = np.empty(groups, np.float32)
    if low_bits == 4 and (not with_lsb or shift == 4):  # bytes of two 4-bit values, low nibble first
        half, per_group = cols // 2, group // 2
        xe = np.empty((n_tok, half), np.float32)  # x at even and odd columns
        xo = np.empty((n_tok, half), np.float32)
        for t in range(n_tok):
            for k in range(half):
                xe[t, k] = x[t, 2 * k]
                xo[t, k] = x[t, 2 * k + 1]
        we = np.empty(half, np.float32)  # the row's weights at even and odd columns
        wo = np.empty(half, np.float32)
        for r in range(first_row, last_row):
            _row_groups(scales, zero_points, r * groups, zp_shift, scale_bits, zp)
            m = msb_packed[r * half : (r + 1) * half]
            lo = lsb_packed[r * half : (r + 1) * half] if with_lsb else m
            for g in range(groups):
                s, z = scale[g] * factor, zp[g]
                if with_lsb:  # q = msb << 4 | lsb
                    for k in range(g * per_group, (g + 1) * per_group):
                        we[k] = (np.float32(((m[k] & uint8(15)) << uint8(4)) | (lo[k] & uint8(15))) - z) * s
                        wo[k] = (np.float32((m[k] & uint8(240)) | (lo[k] >> uint8(4))) - z) * s
                else:
                    for k in range(g * per_group, (g + 1) * per_group):
                        we[k] = (np.float32(m[k] & uint8(15)) - z) * s
                        wo[k] = (np.float32(m[k] >> uint8(4)) - z) * s
            for t in range(n_tok):
                xet, xot = xe[t], xo[t]
                acc = np.float32(0.0)
                for k in range(half):
                    acc += we[k] * xet[k] + wo[k] * xot[k]
                out[t, r] = acc
    else:
        q = np.empty(cols, np.int32)
        lsb = np.empty(cols, np.int32)
        w = np.empty(cols, np.float32)
        for r in range(first_row, last_row):
            _row_groups(scales, zero_points, r * groups, zp_shift, scale_bits, zp)
            _unpack(msb_packed, r * (cols * low_bits // 8), low_bits, q)
            if with_lsb:
                _unpack(lsb_packed, r * (cols * shift // 8), shift, lsb)
                for j in range(cols):
                    q[j] = (q[j] << shift) | lsb[j]
            for g in range(groups):
                s, z = scale[g] * factor, zp[g]
                for j in range(g * group, (g + 1) * group):
                    w[j] = (np.float32(q[j]) - z) * s
            for t in range(n_tok):
                xt = x[t]
                acc = np.float32(0.0)
                for j in range(cols):
                    acc += w[j] * xt[j]
                out[t, r] = acc


def matmul_slices(
    x: np.ndarray,
    msb: np.ndarray,
    lsb: np.ndarray | None,
    rows: int,
    cols: int,
    spec: SliceSpec,
    precision: Precision,
    workers: Workers,
) -> np.ndarray:
    """``x @ W.T`` (float32 ``[T, rows]``) for ``x`` float32 ``[T, cols]`` and ``W`` the weights of the slices."""
    parts, lsb = slice_parts(msb, lsb, rows, cols, spec, precision)
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty((x.shape[0], rows), np.float32)
    workers.run_ranges(
        lambda a, b: matvec_slices(
            parts.packed, lsb, parts.scales, parts.zero_points, cols, spec.group_size, spec.high_bits,
            spec.low_bits, int(precision), x, a, b, out,
        ),
        rows,
        min_rows(cols) // max(1, x.shape[0]),
    )  # fmt: skip
    return out
