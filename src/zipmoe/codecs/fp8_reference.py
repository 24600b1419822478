"""Plain numpy twins of the FP8 kernels in `zipmoe.codecs.fp8`: slow, obviously correct, the tests' oracle.

Nothing in the product calls these; they restate docs/FORMAT.md §3.8 (``fp8-split``) in the simplest code we could
write.
"""

from __future__ import annotations

import numpy as np


def split_fp8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nibble plane, exponent symbols) of FP8 E4M3 bytes: the plane holds ``ceil(n / 2)`` bytes, value ``2j`` in
    the low nibble of byte ``j`` and value ``2j + 1`` in its high nibble; the symbols are ``(x >> 3) & 0xF``."""
    values = values.astype(np.uint8)
    exponents = (values >> 3) & 0xF
    nibbles = ((values >> 4) & 0x8) | (values & 0x7)
    padded = np.zeros(nibbles.size + nibbles.size % 2, np.uint8)
    padded[: nibbles.size] = nibbles
    plane = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)
    return plane, exponents.astype(np.uint8)


def merge_fp8(exponents: np.ndarray, plane: np.ndarray, n: int) -> np.ndarray:
    """FP8 E4M3 bytes from ``n`` exponent symbols and the nibble plane."""
    nibbles = np.empty(2 * plane.size, np.uint8)
    nibbles[0::2] = plane & 0xF
    nibbles[1::2] = plane >> 4
    nibbles = nibbles[:n]
    return (((nibbles & 0x8) << 4) | (exponents.astype(np.uint8)[:n] << 3) | (nibbles & 0x7)).astype(np.uint8)
