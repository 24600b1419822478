"""FP8 E4M3 (``float8_e4m3fn``) values in numpy, and the 128x128 block quantization DeepSeek-V3 ships its weights in.

numpy has no float8 type, so FP8 tensors are their bit patterns (uint8). E4M3 "fn" has no infinities: exponent 15
with mantissa 7 is NaN (0x7F, 0xFF), so the largest finite value is 448 (0x7E).

DeepSeek-V3 stores each linear weight ``W [R, C]`` as ``q = fp8(W / s)`` with one float32 ``s = amax / 448`` per
128x128 block (``amax`` the block's largest magnitude), saved as ``weight_scale_inv`` of shape ``[ceil(R / 128),
ceil(C / 128)]``; ``W ~ q * s`` (`dequantize_blocks`). `quantize_blocks` makes FP8 weights the same way, for the
codec benchmark and the tests, from any trained float weights.
"""

from __future__ import annotations

import numpy as np

from zipmoe.errors import ZipmoeError

FP8_MAX = 448.0
BLOCK = 128


def e4m3_to_float32(values: np.ndarray) -> np.ndarray:
    """The float32 value of each FP8 E4M3 bit pattern (uint8); NaN for 0x7F and 0xFF."""
    return _DECODE[values.astype(np.uint8)]


def _decode_table() -> np.ndarray:
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = (codes >> 3) & 0xF
    mantissa = codes & 0x7
    normal = (1 + mantissa / 8) * np.exp2(exponent - 7.0)
    subnormal = mantissa / 8 * 2.0**-6
    table = sign * np.where(exponent == 0, subnormal, normal)
    table[(codes & 0x7F) == 0x7F] = np.nan
    return table.astype(np.float32)


_DECODE = _decode_table()
_POSITIVE = _DECODE[:0x7F].astype(np.float64)  # codes 0..126: increasing, 0 to 448


def float32_to_e4m3(values: np.ndarray) -> np.ndarray:
    """FP8 E4M3 bit patterns (uint8) of float values, rounded to nearest, ties to even (as torch's cast does);
    values beyond +-448 saturate to +-448 (callers scale them into range first), NaN gives 0x7F."""
    x = np.asarray(values, np.float64)
    magnitude = np.minimum(np.abs(x), FP8_MAX)
    upper = np.clip(np.searchsorted(_POSITIVE, magnitude, side="left"), 0, 0x7E)  # first code >= magnitude
    lower = np.maximum(upper - 1, 0)
    below, above = magnitude - _POSITIVE[lower], _POSITIVE[upper] - magnitude
    take_upper = (above < below) | ((above == below) & (upper % 2 == 0))
    code = np.where(magnitude == _POSITIVE[upper], upper, np.where(take_upper, upper, lower)).astype(np.uint8)
    code |= np.where(np.signbit(x), 0x80, 0).astype(np.uint8)
    code[np.isnan(x)] = 0x7F
    return code


def quantize_blocks(weights: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's weight quantization of a 2-D float matrix.

    Args:
        weights: ``[R, C]`` float values (finite).
        block: the block edge (128 in DeepSeek-V3's ``weight_block_size``).

    Returns:
        ``(q, scale_inv)``: the FP8 bit patterns ``[R, C]`` (uint8) and the float32 scales ``[ceil(R / block),
        ceil(C / block)]`` (``weight_scale_inv``), with ``weights ~ e4m3_to_float32(q) * scale_inv`` per block.

    Raises:
        ZipmoeError: ``weights`` is not 2-D or holds a value that is not finite.
    """
    w = np.asarray(weights, np.float32)
    if w.ndim != 2 or not np.isfinite(w).all():
        raise ZipmoeError(f"block quantization needs a finite 2-D matrix, got shape {list(w.shape)}")
    rows, cols = w.shape
    n_r, n_c = -(-rows // block), -(-cols // block)
    scale_inv = np.empty((n_r, n_c), np.float32)
    q = np.empty((rows, cols), np.uint8)
    for i in range(n_r):
        for j in range(n_c):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            amax = np.float32(np.abs(tile).max(initial=0.0))
            scale = np.float32(amax / np.float32(FP8_MAX)) if amax > 0 else np.float32(1.0)
            scale_inv[i, j] = scale
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = float32_to_e4m3(tile / scale)
    return q, scale_inv


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """``e4m3_to_float32(q) * scale_inv`` per block (float32), the reference for `zipmoe.runtime.fp8`."""
    values = e4m3_to_float32(q)
    scales = np.repeat(np.repeat(scale_inv, block, axis=0), block, axis=1)[: q.shape[0], : q.shape[1]]
    return (values * scales).astype(np.float32)
