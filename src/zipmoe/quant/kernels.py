"""Numba kernels: AMAT quantization into packed MSB/LSB slices, and dequantization back to float32 weights.

Every kernel takes flat arrays and a row range, writes into preallocated outputs and releases the GIL, so rows
spread over worker threads. All arithmetic is float32 and exactly the rule of `docs/FORMAT.md` (no fast-math), so
the numpy twins in `zipmoe.quant.reference` give the same bits. The layout is described in `zipmoe.quant.spec`.

Each row goes through a few simple loops (widen, reduce, quantize, pack; or unpack, combine, scale) rather than one
loop doing everything per value, so that LLVM vectorizes them; 1, 2, 4 and 8-bit packing have their own loops.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_ONE_F32 = 0x3F800000  # 1.0: the scale of an all-zero group
_EXPONENT = 0x7F80  # BF16 exponent bits: all set means infinity or NaN


@njit(nogil=True, cache=True)
def _pack(values, width, out, at):  # pragma: no cover - compiled
    """Pack ``values`` (int32, each < 2**width, a multiple of 8 of them) into ``out[at:]``.

    Value ``i`` of each eight occupies bits ``width*i .. width*i+width-1`` of the little-endian integer that the
    eight's ``width`` bytes form.
    """
    n = values.size
    if width == 8:
        for i in range(n):
            out[at + i] = np.uint8(values[i])
    elif width == 4:
        for k in range(n // 2):
            out[at + k] = np.uint8(values[2 * k] | (values[2 * k + 1] << 4))
    elif width == 2:
        for k in range(n // 4):
            v = values[4 * k] | (values[4 * k + 1] << 2) | (values[4 * k + 2] << 4) | (values[4 * k + 3] << 6)
            out[at + k] = np.uint8(v)
    elif width == 1:
        for k in range(n // 8):
            v = 0
            for i in range(8):
                v |= values[8 * k + i] << i
            out[at + k] = np.uint8(v)
    else:
        for block in range(n // 8):
            acc = np.uint64(0)
            for i in range(8):
                acc |= np.uint64(values[8 * block + i]) << np.uint64(width * i)
            for k in range(width):
                out[at + block * width + k] = np.uint8((acc >> np.uint64(8 * k)) & np.uint64(0xFF))


@njit(nogil=True, cache=True)
def _unpack(packed, at, width, values):  # pragma: no cover - compiled
    """Inverse of `_pack`: ``values.size`` values (int32) from ``packed[at:]``."""
    n = values.size
    if width == 8:
        for i in range(n):
            values[i] = packed[at + i]
    elif width == 4:
        for k in range(n // 2):
            b = np.int32(packed[at + k])
            values[2 * k] = b & 15
            values[2 * k + 1] = b >> 4
    elif width == 2:
        for k in range(n // 4):
            b = np.int32(packed[at + k])
            values[4 * k] = b & 3
            values[4 * k + 1] = (b >> 2) & 3
            values[4 * k + 2] = (b >> 4) & 3
            values[4 * k + 3] = b >> 6
    elif width == 1:
        for k in range(n // 8):
            b = np.int32(packed[at + k])
            for i in range(8):
                values[8 * k + i] = (b >> i) & 1
    else:
        mask = np.uint64((1 << width) - 1)
        for block in range(n // 8):
            acc = np.uint64(0)
            for k in range(width):
                acc |= np.uint64(packed[at + block * width + k]) << np.uint64(8 * k)
            for i in range(8):
                values[8 * block + i] = np.int32((acc >> np.uint64(width * i)) & mask)


@njit(nogil=True, cache=True)
def quantize_slices(
    values, cols, group, high_bits, low_bits, first_row, last_row, msb_packed, lsb_packed, scales, zero_points
):  # pragma: no cover - compiled
    """Quantize rows ``first_row..last_row-1`` of BF16 ``values`` (uint16, row-major ``[rows, cols]``).

    Writes the packed MSB values (``low_bits`` each), the packed LSB values (``high_bits - low_bits`` each; none
    when that is 0), one BF16 scale (uint16 bits) and one zero-point per group. Returns -1, or the first row that
    holds a value that is not finite or a group whose scale overflows.
    """
    shift = high_bits - low_bits
    qmax = np.float32((1 << high_bits) - 1)
    zero = np.float32(0.0)
    groups = cols // group
    wide = np.empty(cols, np.uint32)
    w = wide.view(np.float32)
    scale_bits = np.empty(1, np.uint32)
    scale_view = scale_bits.view(np.float32)
    q = np.empty(cols, np.int32)
    msb = np.empty(cols, np.int32)
    lsb = np.empty(cols, np.int32)
    for r in range(first_row, last_row):
        row = values[r * cols : (r + 1) * cols]
        special = 0
        for j in range(cols):
            special |= (row[j] & _EXPONENT) == _EXPONENT
            wide[j] = np.uint32(row[j]) << np.uint32(16)
        if special:
            return r
        for g in range(groups):
            lo = zero
            hi = zero
            for j in range(g * group, (g + 1) * group):
                lo = min(lo, w[j])
                hi = max(hi, w[j])
            scale_view[0] = np.float32(hi - lo) / qmax
            if scale_bits[0] & np.uint32(0xFFFF):  # round up to the next BF16 value: the range stays covered
                scale_bits[0] = (scale_bits[0] + np.uint32(0x10000)) & np.uint32(0xFFFF0000)
            if scale_bits[0] == 0:
                scale_bits[0] = np.uint32(_ONE_F32)
            scale = scale_view[0]
            if not np.isfinite(scale):
                return r
            zp = min(max(np.rint(np.float32(-lo) / scale), zero), qmax)
            for j in range(g * group, (g + 1) * group):
                q[j] = np.int32(min(max(np.rint(w[j] / scale) + zp, zero), qmax))
            scales[r * groups + g] = np.uint16(scale_bits[0] >> np.uint32(16))
            zero_points[r * groups + g] = np.uint8(np.int32(zp))
        for j in range(cols):
            msb[j] = q[j] >> shift
            lsb[j] = q[j] & ((1 << shift) - 1)
        _pack(msb, low_bits, msb_packed, r * (cols * low_bits // 8))
        if shift:
            _pack(lsb, shift, lsb_packed, r * (cols * shift // 8))
    return -1


@njit(nogil=True, cache=True)
def dequantize_slices(
    msb_packed, lsb_packed, scales, zero_points, cols, group, high_bits, low_bits, mode, first_row, last_row, out
):  # pragma: no cover - compiled
    """Float32 weights of rows ``first_row..last_row-1`` from slices (``out`` row-major ``[rows, cols]``).

    ``mode`` is a `Precision`: 0 high (MSB and LSB), 1 low (MSB, zero-point shifted with the values), 2 naive
    truncation (MSB, high-bit zero-point).
    """
    shift = high_bits - low_bits
    groups = cols // group
    scale_bits = np.empty(1, np.uint32)
    scale_view = scale_bits.view(np.float32)
    factor = np.float32(1.0) if mode == 0 else np.float32(1 << shift)
    q = np.empty(cols, np.int32)
    lsb = np.empty(cols, np.int32)
    for r in range(first_row, last_row):
        _unpack(msb_packed, r * (cols * low_bits // 8), low_bits, q)
        if mode == 0 and shift:
            _unpack(lsb_packed, r * (cols * shift // 8), shift, lsb)
            for j in range(cols):
                q[j] = (q[j] << shift) | lsb[j]
        for g in range(groups):
            scale_bits[0] = np.uint32(scales[r * groups + g]) << np.uint32(16)
            scale = scale_view[0] * factor
            zp = np.int32(zero_points[r * groups + g])
            if mode == 1:
                zp >>= shift
            at = r * cols
            for j in range(g * group, (g + 1) * group):
                out[at + j] = np.float32(q[j] - zp) * scale
