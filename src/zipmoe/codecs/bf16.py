"""Bit planes of BF16 values: one sign+mantissa byte and one exponent byte per value.

A BF16 value is 16 bits, stored little-endian as a ``uint16``::

    bit  15   14 ............ 7   6 ........ 0
        [ s ][ e7 e6 e5 e4 e3 e2 e1 e0 ][ m6 ... m0 ]

    exponent byte      = e7..e0                 = (x >> 7) & 0xFF
    sign_mantissa byte = s m6 m5 m4 m3 m2 m1 m0 = ((x >> 8) & 0x80) | (x & 0x7F)

The split is a bijection on all 65,536 patterns (NaN payloads, infinities, signed zeros and subnormals included),
so `merge_bf16(split_bf16(x)) == x` bit for bit. Kernels take arrays and write into preallocated outputs; the numpy
twins in `zipmoe.codecs.reference` are the test oracle.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def split_bf16(values, sign_mantissa, exponents):  # pragma: no cover - compiled
    """Split ``values`` (uint16) into ``sign_mantissa`` and ``exponents`` (uint8, same length)."""
    for i in range(values.size):
        x = values[i]
        exponents[i] = (x >> 7) & 0xFF
        sign_mantissa[i] = ((x >> 8) & 0x80) | (x & 0x7F)


@njit(nogil=True, cache=True)
def extract_sign_mantissa(values, sign_mantissa):  # pragma: no cover - compiled
    """Write the sign+mantissa byte of each uint16 value in ``values`` into ``sign_mantissa``."""
    for i in range(values.size):
        x = values[i]
        sign_mantissa[i] = ((x >> 8) & 0x80) | (x & 0x7F)


@njit(nogil=True, cache=True)
def extract_exponents(values, exponents):  # pragma: no cover - compiled
    """Write the exponent byte of each uint16 value in ``values`` into ``exponents``."""
    for i in range(values.size):
        exponents[i] = (values[i] >> 7) & 0xFF


@njit(nogil=True, cache=True)
def merge_bf16(exponents, sign_mantissa, out):  # pragma: no cover - compiled
    """Rebuild BF16 values from the two planes (exact inverse of `split_bf16`).

    ``out`` is uint16 (the BF16 bit patterns) or uint32: the float32 bit patterns of the same values (BF16 << 16),
    which saves a conversion pass when the model computes in float32.
    """
    if out.itemsize == 4:
        for i in range(out.size):
            sm = np.uint32(sign_mantissa[i])
            out[i] = (
                ((sm & np.uint32(0x80)) << np.uint32(8))
                | (np.uint32(exponents[i]) << np.uint32(7))
                | (sm & np.uint32(0x7F))
            ) << np.uint32(16)
    else:
        for i in range(out.size):
            sm = np.uint16(sign_mantissa[i])
            out[i] = (
                ((sm & np.uint16(0x80)) << np.uint16(8))
                | (np.uint16(exponents[i]) << np.uint16(7))
                | (sm & np.uint16(0x7F))
            )


@njit(nogil=True, cache=True)
def widen_bf16(values, out):  # pragma: no cover - compiled
    """Float32 bit patterns (uint32) of BF16 bit patterns (uint16): ``out[i] = values[i] << 16``."""
    for i in range(out.size):
        out[i] = np.uint32(values[i]) << np.uint32(16)


@njit(nogil=True, cache=True)
def exponent_histogram(values, counts):  # pragma: no cover - compiled
    """Add the number of occurrences of each exponent byte in ``values`` (uint16) to ``counts`` (int64[256])."""
    for i in range(values.size):
        counts[(values[i] >> 7) & 0xFF] += 1


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy in bits per symbol of a histogram (0.0 for an empty one)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())
