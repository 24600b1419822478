"""Plain numpy / Python twins of the compiled kernels: slow, obviously correct, the oracle the tests compare with.

Nothing in the product calls these; they restate `docs/FORMAT.md` in the simplest code we could write.
"""

from __future__ import annotations

import numpy as np

from zipmoe.codecs import rans

_MASK64 = (1 << 64) - 1


def split_bf16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sign_mantissa, exponents) of uint16 BF16 patterns."""
    values = values.astype(np.uint16)
    exponents = ((values >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((values >> 8) & 0x80) | (values & 0x7F)).astype(np.uint8)
    return sign_mantissa, exponents


def merge_bf16(exponents: np.ndarray, sign_mantissa: np.ndarray) -> np.ndarray:
    """uint16 BF16 patterns from the two byte planes."""
    sm = sign_mantissa.astype(np.uint16)
    return ((sm & 0x80) << 8) | (exponents.astype(np.uint16) << 7) | (sm & 0x7F)


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 exactly as in the xxHash specification."""
    p1, p2, p3, p4, p5 = (
        0x9E3779B185EBCA87,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0x85EBCA77C2B2AE63,
        0x27D4EB2F165667C5,
    )

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (64 - r))) & _MASK64

    def rnd(acc: int, lane: int) -> int:
        return (rotl((acc + lane * p2) & _MASK64, 31) * p1) & _MASK64

    n = len(data)
    i = 0
    if n >= 32:
        v = [(seed + p1 + p2) & _MASK64, (seed + p2) & _MASK64, seed, (seed - p1) & _MASK64]
        while i + 32 <= n:
            for j in range(4):
                v[j] = rnd(v[j], int.from_bytes(data[i + 8 * j : i + 8 * j + 8], "little"))
            i += 32
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & _MASK64
        for lane in v:
            h = ((h ^ rnd(0, lane)) * p1 + p4) & _MASK64
    else:
        h = (seed + p5) & _MASK64
    h = (h + n) & _MASK64
    while i + 8 <= n:
        h ^= rnd(0, int.from_bytes(data[i : i + 8], "little"))
        h = (rotl(h, 27) * p1 + p4) & _MASK64
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(data[i : i + 4], "little") * p1) & _MASK64
        h = (rotl(h, 23) * p2 + p3) & _MASK64
        i += 4
    while i < n:
        h ^= (data[i] * p5) & _MASK64
        h = (rotl(h, 11) * p1) & _MASK64
        i += 1
    h ^= h >> 33
    h = (h * p2) & _MASK64
    h ^= h >> 29
    h = (h * p3) & _MASK64
    h ^= h >> 32
    return h


def normalize_frequencies(counts: list[int]) -> list[int]:
    """Same rule as `rans.normalize_frequencies`, in Python integers."""
    total = sum(counts)
    target = 1 << rans.PRECISION_BITS
    freqs = [max(1, (c * target + total // 2) // total) if c else 0 for c in counts]
    while sum(freqs) > target:
        candidates = [i for i in range(256) if freqs[i] > 1]
        best = candidates[0]
        for i in candidates[1:]:
            if counts[i] * freqs[best] < counts[best] * freqs[i]:
                best = i
        freqs[best] -= 1
    while sum(freqs) < target:
        candidates = [i for i in range(256) if counts[i]]
        best = candidates[0]
        for i in candidates[1:]:
            if counts[i] * (freqs[best] + 1) > counts[best] * (freqs[i] + 1):
                best = i
        freqs[best] += 1
    return freqs


def _header_nbytes(n_symbols: int, n_tail: int) -> int:
    return (2 + 3 * n_symbols + n_tail + 7) & ~7


def rans_encode(exponents: bytes) -> bytes:
    """The rANS payload of one chunk of exponent bytes (see `zipmoe.codecs.rans` for the layout)."""
    n = len(exponents)
    lanes, group, m = rans.LANES, rans.GROUP, 1 << rans.PRECISION_BITS
    stored = bytes([rans.MODE_STORED, 0]) + bytes(exponents)
    counts = [0] * 256
    for e in exponents:
        counts[e] += 1
    symbols = [i for i in range(256) if counts[i]]
    n_groups, n_tail = divmod(n, group)
    header_nbytes = _header_nbytes(len(symbols), n_tail)
    if not symbols or header_nbytes + 8 * lanes >= n + 2:
        return stored
    freqs = normalize_frequencies(counts)
    cum = [0] * 257
    for i in range(256):
        cum[i + 1] = cum[i] + freqs[i]

    states = [rans.STATE_LOWER] * lanes
    emitted: list[int] = []  # in encoding order; the stream holds them reversed
    for g in reversed(range(n_groups)):
        for j in reversed(range(lanes)):
            lane_symbols = [exponents[g * group + step * lanes + j] for step in range(rans.STEPS)]
            bound = (rans.STATE_LOWER // m**rans.STEPS) << 32
            for s in lane_symbols:
                bound *= freqs[s]
            x = states[j]
            if x >= bound:
                emitted.append(x & 0xFFFFFFFF)
                x >>= 32
            for s in reversed(lane_symbols):
                x = (x // freqs[s]) * m + cum[s] + x % freqs[s]
            states[j] = x
    if header_nbytes + 8 * lanes + 4 * len(emitted) >= n + 2:
        return stored

    out = bytearray([rans.MODE_RANS, len(symbols) - 1])
    out += bytes(symbols)
    for s in symbols:
        out += freqs[s].to_bytes(2, "little")
    out += bytes(exponents[n_groups * group :])
    out += bytes(header_nbytes - len(out))
    for x in states:
        out += x.to_bytes(8, "little")
    for w in reversed(emitted):
        out += w.to_bytes(4, "little")
    return bytes(out)


def rans_decode(payload: bytes, n: int) -> bytes:
    """Exponent bytes of one chunk from its payload; raises ValueError on any inconsistency."""
    lanes, group, m = rans.LANES, rans.GROUP, 1 << rans.PRECISION_BITS
    if payload[0] == rans.MODE_STORED:
        if len(payload) != n + 2:
            raise ValueError("stored payload size")
        return bytes(payload[2:])
    if payload[0] != rans.MODE_RANS:
        raise ValueError("mode")
    n_symbols = payload[1] + 1
    symbols = list(payload[2 : 2 + n_symbols])
    freqs = [int.from_bytes(payload[2 + n_symbols + 2 * i : 4 + n_symbols + 2 * i], "little") for i in range(n_symbols)]
    if sorted(set(symbols)) != symbols or min(freqs) < 1 or sum(freqs) != m:
        raise ValueError("table")
    slot_symbol, slot_freq, slot_bias = [], [], []
    for s, f in zip(symbols, freqs):
        slot_symbol += [s] * f
        slot_freq += [f] * f
        slot_bias += list(range(f))
    n_groups, n_tail = divmod(n, group)
    tail = payload[2 + 3 * n_symbols : 2 + 3 * n_symbols + n_tail]
    h = _header_nbytes(n_symbols, n_tail)
    states = [int.from_bytes(payload[h + 8 * j : h + 8 * j + 8], "little") for j in range(lanes)]
    words_bytes = payload[h + 8 * lanes :]
    if len(words_bytes) % 4:
        raise ValueError("size")
    words = [int.from_bytes(words_bytes[i : i + 4], "little") for i in range(0, len(words_bytes), 4)]
    out = bytearray(n)
    p = 0
    for g in range(n_groups):
        for step in range(rans.STEPS):
            for j in range(lanes):
                x = states[j]
                slot = x & (m - 1)
                out[g * group + step * lanes + j] = slot_symbol[slot]
                states[j] = slot_freq[slot] * (x >> rans.PRECISION_BITS) + slot_bias[slot]
        for j in range(lanes):
            if states[j] < rans.STATE_LOWER:
                if p >= len(words):
                    raise ValueError("overrun")
                states[j] = (states[j] << 32) | words[p]
                p += 1
    if p != len(words) or any(x != rans.STATE_LOWER for x in states):
        raise ValueError("final state")
    out[n_groups * group :] = tail
    return bytes(out)
