"""BF16 bit planes: the split is exact for all 65,536 patterns, and the kernels equal their numpy twins."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from zipmoe.codecs import bf16, reference

ALL_PATTERNS = np.arange(1 << 16, dtype=np.uint16)  # +-0, subnormals, +-inf, every NaN payload


def split(values):
    sm = np.empty(values.size, np.uint8)
    ex = np.empty(values.size, np.uint8)
    bf16.split_bf16(values, sm, ex)
    return sm, ex


def test_split_merge_is_exact_for_every_bf16_pattern():
    sm, ex = split(ALL_PATTERNS)
    out = np.empty_like(ALL_PATTERNS)
    bf16.merge_bf16(ex, sm, out)
    assert np.array_equal(out, ALL_PATTERNS)


def test_kernels_match_the_numpy_reference():
    sm, ex = split(ALL_PATTERNS)
    ref_sm, ref_ex = reference.split_bf16(ALL_PATTERNS)
    assert np.array_equal(sm, ref_sm) and np.array_equal(ex, ref_ex)
    only_sm = np.empty_like(sm)
    only_ex = np.empty_like(ex)
    bf16.extract_sign_mantissa(ALL_PATTERNS, only_sm)
    bf16.extract_exponents(ALL_PATTERNS, only_ex)
    assert np.array_equal(only_sm, ref_sm) and np.array_equal(only_ex, ref_ex)
    assert np.array_equal(reference.merge_bf16(ex, sm), ALL_PATTERNS)


def test_planes_hold_the_documented_bits():
    # 0x3F80 is 1.0: sign 0, exponent 127, mantissa 0; 0xC0490FDB >> 16 = 0xC049 is -3.140625.
    sm, ex = split(np.array([0x3F80, 0xC049, 0x7FC1, 0x8001], np.uint16))
    assert ex.tolist() == [127, 128, 255, 0]
    assert sm.tolist() == [0x00, 0x80 | 0x49, 0x41, 0x81]


def test_histogram_and_entropy():
    values = np.array([0x3F80, 0x3F80, 0x4000, 0x4000], np.uint16)
    counts = np.zeros(256, np.int64)
    bf16.exponent_histogram(values, counts)
    assert counts[127] == 2 and counts[128] == 2 and counts.sum() == 4
    assert bf16.entropy_bits(counts) == 1.0
    assert bf16.entropy_bits(np.zeros(256, np.int64)) == 0.0


@given(arrays(np.uint16, st.integers(0, 5000)))
def test_roundtrip_property(values):
    sm, ex = split(values)
    out = np.empty_like(values)
    bf16.merge_bf16(ex, sm, out)
    assert np.array_equal(out, values)
