"""Interleaved rANS: the kernels produce the reference's bytes, round-trip exactly, and reject corrupt payloads."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zipmoe.codecs import rans, reference

RNG = np.random.default_rng(0)


def values_with(exponents: np.ndarray) -> np.ndarray:
    """BF16 patterns with the given exponents and random sign/mantissa bits."""
    n = exponents.size
    sign = RNG.integers(0, 2, n, dtype=np.uint16) << 15
    mantissa = RNG.integers(0, 128, n, dtype=np.uint16)
    return sign | (exponents.astype(np.uint16) << 7) | mantissa


def kernel_encode(values: np.ndarray) -> bytes:
    n = values.size
    out = np.zeros(rans.max_payload_nbytes(n), np.uint8)
    scratch = (
        np.zeros(n // 2 + 1, np.uint32),
        np.zeros(256, np.int64),
        np.zeros(256, np.int64),
        np.zeros(257, np.int64),
    )
    size = rans.encode_chunk(values, 0, n, out, 0, *scratch)
    return out[:size].tobytes()


def kernel_decode(payload: bytes, values: np.ndarray) -> tuple[int, np.ndarray]:
    """Decode with the sign+mantissa plane of ``values``; returns (status, decoded values)."""
    n = values.size
    sm = (((values >> 8) & 0x80) | (values & 0x7F)).astype(np.uint8)
    start = (n + 7) & ~7
    buf = np.zeros(start + len(payload), np.uint8)
    buf[:n] = sm
    buf[start:] = np.frombuffer(payload, np.uint8)
    out = np.zeros(n, np.uint16)
    status = rans.decode_chunk(
        buf,
        start,
        len(payload),
        buf,
        0,
        out,
        0,
        n,
        np.zeros(1 << rans.PRECISION_BITS, np.uint32),
        np.zeros(max(n, 1), np.uint8),
    )
    return status, out


def exponents(kind: str, n: int) -> np.ndarray:
    if kind == "normal":
        return np.clip(np.round(RNG.normal(120, 2, n)), 0, 255).astype(np.uint8)
    if kind == "uniform":
        return RNG.integers(0, 256, n, dtype=np.uint8)
    if kind == "constant":
        return np.full(n, 121, np.uint8)
    if kind == "rare":
        return RNG.choice(np.array([121, 3, 250], np.uint8), n, p=[0.998, 0.001, 0.001])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["normal", "uniform", "constant", "rare"])
@pytest.mark.parametrize("n", [0, 1, 23, 24, 25, 47, 49, 100, 1000, 4096, 4111, 65536])
def test_kernel_matches_reference_and_roundtrips(kind, n):
    e = exponents(kind, n)
    values = values_with(e)
    payload = kernel_encode(values)
    assert payload == reference.rans_encode(e.tobytes())
    assert reference.rans_decode(payload, n) == e.tobytes()
    status, out = kernel_decode(payload, values)
    assert status == rans.OK
    assert np.array_equal(out, values)
    assert len(payload) <= n + 2


def test_modes():
    assert kernel_encode(values_with(exponents("uniform", 4096)))[0] == rans.MODE_STORED  # incompressible
    assert kernel_encode(values_with(exponents("normal", 4096)))[0] == rans.MODE_RANS
    assert len(kernel_encode(values_with(exponents("constant", 65536)))) < 100


def test_compresses_near_entropy():
    e = exponents("normal", 1 << 16)
    counts = np.bincount(e, minlength=256)
    p = counts[counts > 0] / e.size
    entropy_bytes = -(p * np.log2(p)).sum() * e.size / 8
    assert len(kernel_encode(values_with(e))) < entropy_bytes * 1.01 + 200


def test_normalize_matches_reference():
    for kind in ["normal", "uniform", "rare"]:
        counts = np.bincount(exponents(kind, 5000), minlength=256).astype(np.int64)
        freqs = np.zeros(256, np.int64)
        rans.normalize_frequencies(counts, int(counts.sum()), freqs)
        assert freqs.tolist() == reference.normalize_frequencies(counts.tolist())
        assert (
            freqs.sum() == 1 << rans.PRECISION_BITS
            and np.all(freqs[counts > 0] >= 1)
            and np.all(freqs[counts == 0] == 0)
        )


def test_every_corrupted_byte_is_rejected_or_changes_nothing_silently():
    """A flipped byte anywhere in a payload either fails decoding or, at worst, yields wrong values; it never
    crashes or reads out of bounds. (The chunk checksums catch the second case; see test_parts.)"""
    e = exponents("normal", 1000)
    values = values_with(e)
    payload = bytearray(kernel_encode(values))
    rejected = 0
    for i in range(len(payload)):
        for bit in (0, 7):
            payload[i] ^= 1 << bit
            status, out = kernel_decode(bytes(payload), values)
            rejected += status != rans.OK
            payload[i] ^= 1 << bit
    assert rejected > len(payload)  # most corruptions are caught by the decoder's own end-state check


def test_truncated_payload_is_rejected():
    values = values_with(exponents("normal", 4096))
    payload = kernel_encode(values)
    for cut in (1, 3, 4, 8, len(payload) // 2, len(payload) - 1):
        status, _ = kernel_decode(payload[:cut], values)
        assert status != rans.OK
    assert rans.rans_status_message(rans.STREAM_OVERRUN) == "rANS stream ends early"


@given(st.lists(st.integers(0, 255), max_size=3000), st.integers(1, 40))
def test_roundtrip_property(symbols, spread):
    e = (np.array(symbols, np.int64) % spread + 100).astype(np.uint8)
    values = values_with(e)
    payload = kernel_encode(values)
    status, out = kernel_decode(payload, values)
    assert status == rans.OK and np.array_equal(out, values)


def test_division_by_multiplication_is_exact():
    """The encoder divides by multiplying with rans._RECIPROCAL; check every frequency on edge and random states."""
    from numba import njit

    from zipmoe.codecs.intrinsics import mulhi64

    @njit
    def first_wrong(xs, freqs, rcp, shift):
        top = np.uint64(1) << np.uint64(63)
        for f in freqs:
            for x in xs:
                below = x - x % f  # a multiple of f; below + f - 1 is the largest value with the same quotient
                for y in (x, below, below + f - np.uint64(1)):
                    if y < top and mulhi64(y, rcp[f]) >> shift[f] != y // f:
                        return f, y
        return np.uint64(0), np.uint64(0)

    rng = np.random.default_rng(7)
    xs = np.concatenate(
        [rng.integers(1, 2**63, 2000, dtype=np.uint64), np.array([1, 2, 3, 1023, 1024, 2**62, 2**63 - 1], np.uint64)]
    )
    freqs = np.arange(2, (1 << rans.PRECISION_BITS) + 1, dtype=np.uint64)
    assert first_wrong(xs, freqs, rans._RECIPROCAL, rans._RECIPROCAL_SHIFT) == (0, 0)
