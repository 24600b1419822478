"""AMAT quantization: kernels equal their numpy twins bit for bit, and the slices mean what SliceMoE says."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zipmoe._threads import Workers
from zipmoe.errors import FormatError
from zipmoe.quant import reference as ref
from zipmoe.quant import torch_ops
from zipmoe.quant.amat import base_quantized, dequantize_tensor, quantize_tensor
from zipmoe.quant.matvec import matmul_slices
from zipmoe.quant.spec import Precision, SliceError, SliceSpec, parse_slices

SPECS = [SliceSpec(8, 4), SliceSpec(6, 3), SliceSpec(4, 2), SliceSpec(8, 7), SliceSpec(2, 1), SliceSpec(8, 1),
         SliceSpec(5, 2, 16)]  # fmt: skip


def bf16(x: np.ndarray) -> np.ndarray:
    """BF16 patterns (uint16) of float32 values, by truncation."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def weights(rows: int, cols: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(rows * cols).astype(np.float32) * scale
    x[rng.integers(0, x.size, 5)] *= 40  # outliers stretch their groups
    x[: cols // 2] = 0  # an all-zero group
    x[cols : cols + 32] = 0.125  # a constant group
    return bf16(x)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_kernels_match_the_numpy_twin(spec):
    rows, cols = 24, 8 * spec.group_size
    values = weights(rows, cols)
    workers = Workers(2)
    msb, lsb = quantize_tensor(values, rows, cols, spec, workers)
    ref_msb, ref_lsb = ref.slices(values, rows, cols, spec)
    assert np.array_equal(msb, ref_msb) and np.array_equal(lsb, ref_lsb)
    assert msb.size == spec.msb_nbytes(rows, cols) and lsb.size == spec.lsb_nbytes(rows, cols)
    for precision in Precision:
        out = np.empty(rows * cols, np.float32)
        dequantize_tensor(msb, lsb, rows, cols, spec, precision, out, workers)
        expected = ref.dequantize(msb, lsb, rows, cols, spec, precision)
        assert np.array_equal(out.view(np.uint32), expected.reshape(-1).view(np.uint32))
        on_torch = torch_ops.dequantize(torch.from_numpy(msb), torch.from_numpy(lsb), rows, cols, spec, precision,
                                        torch.float32)  # fmt: skip
        assert np.array_equal(on_torch.numpy().reshape(-1).view(np.uint32), out.view(np.uint32))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
@pytest.mark.parametrize("n_tokens", [1, 3, 17])
def test_products_straight_from_slices_match_the_dequantized_weights(spec, n_tokens):
    rows, cols = 40, 4 * spec.group_size
    msb, lsb = quantize_tensor(weights(rows, cols, seed=n_tokens), rows, cols, spec, Workers(1))
    x = np.random.default_rng(n_tokens).standard_normal((n_tokens, cols)).astype(np.float32)
    for precision in Precision:
        w = ref.dequantize(msb, lsb, rows, cols, spec, precision).reshape(rows, cols).astype(np.float64)
        expected = x.astype(np.float64) @ w.T
        bound = 1e-6 * (np.abs(x) @ np.abs(w).T) + 1e-30  # float32 rounding of the sums, whatever their order
        for threads in (1, 3):
            got = matmul_slices(x, msb, lsb if precision == Precision.HIGH else None, rows, cols, spec, precision,
                                Workers(threads))  # fmt: skip
            assert got.shape == (n_tokens, rows) and np.all(np.abs(got - expected) <= bound)
    with pytest.raises(ValueError, match="needs the LSB slice"):
        matmul_slices(x, msb, None, rows, cols, spec, Precision.HIGH, Workers(1))


@given(
    st.sampled_from(SPECS),
    st.integers(1, 6),
    st.integers(1, 4),
    st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64),
)
def test_any_finite_bf16_pattern_quantizes_like_the_twin(spec, rows, groups, patterns):
    cols = groups * spec.group_size
    values = np.resize(np.array(patterns, np.uint16), rows * cols)
    exponent = values & 0x7F80
    values = np.where(exponent == 0x7F80, values & 0xBFFF, values).astype(np.uint16)  # no inf/NaN
    values = np.where((values & 0x7FFF) > 0x7E00, values & 0x8000 | 0x7E00, values).astype(np.uint16)  # finite range
    msb, lsb = quantize_tensor(values, rows, cols, spec, Workers(1))
    ref_msb, ref_lsb = ref.slices(values, rows, cols, spec)
    assert np.array_equal(msb, ref_msb) and np.array_equal(lsb, ref_lsb)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_slices_are_the_top_and_bottom_bits_of_the_high_bit_values(spec):
    rows, cols = 8, 4 * spec.group_size
    values = weights(rows, cols, seed=1)
    q, scale, zp = ref.quantize(values, cols, spec.group_size, spec.high_bits)
    msb, lsb = quantize_tensor(values, rows, cols, spec, Workers(1))
    n = rows * cols
    assert np.array_equal(ref.unpack(msb[: n * spec.low_bits // 8], spec.low_bits), (q >> spec.shift).reshape(-1))
    assert np.array_equal(ref.unpack(lsb, spec.shift), (q & ((1 << spec.shift) - 1)).reshape(-1))
    # MSB+LSB dequantize to exactly the high-bit weights, computed without slicing.
    high = np.empty(n, np.float32)
    dequantize_tensor(msb, lsb, rows, cols, spec, Precision.HIGH, high, Workers(1))
    direct = base_quantized(values, rows, cols, spec.high_bits, spec.group_size, Workers(1))
    assert np.array_equal(high.view(np.uint32), direct.view(np.uint32))
    # The low-bit weights follow the paper: q >> shift and zp >> shift, the step 2**shift times larger.
    low = np.empty(n, np.float32)
    dequantize_tensor(msb, None, rows, cols, spec, Precision.LOW, low, Workers(1))
    g = spec.group_size
    expected = ((q.reshape(-1, g) >> spec.shift) - (zp.reshape(-1, 1) >> spec.shift)) * (
        scale.reshape(-1, 1) * (1 << spec.shift)
    )
    assert np.array_equal(low, expected.astype(np.float32).reshape(-1))


def test_high_bit_error_is_at_most_half_a_step():
    rows, cols = 64, 256
    values = weights(rows, cols, seed=2)
    q, scale, zp = ref.quantize(values, cols, 32, 8)
    w = ref.bf16_to_float32(values).reshape(-1, 32)
    high = base_quantized(values, rows, cols, 8, 32, Workers(1)).reshape(-1, 32)
    assert np.all(np.abs(high - w) <= scale[..., None].reshape(-1, 1) * 0.5 * (1 + 1e-6))
    assert ref.round_up_bf16(scale).tolist() == scale.tolist()  # scales are BF16 values
    assert np.all(np.abs(w).max(axis=1) <= 255 * scale.reshape(-1))  # the range is covered, nothing clipped


def test_amat_low_bits_beat_naive_truncation_by_far():
    rows, cols = 128, 512
    values = weights(rows, cols, seed=3)
    w = ref.bf16_to_float32(values)
    spec = SliceSpec(8, 4)
    msb, lsb = quantize_tensor(values, rows, cols, spec, Workers(1))

    def rmse(precision):
        out = np.empty(rows * cols, np.float32)
        dequantize_tensor(msb, lsb, rows, cols, spec, precision, out, Workers(1))
        return float(np.sqrt(np.mean((out - w) ** 2)))

    base = float(np.sqrt(np.mean((base_quantized(values, rows, cols, 4, 32, Workers(1)) - w) ** 2)))
    assert rmse(Precision.HIGH) < 0.1 * rmse(Precision.LOW)
    assert rmse(Precision.LOW) < 1.6 * base  # floor-truncating value and zero-point costs at most ~sqrt(2)
    assert rmse(Precision.TRUNC) > 20 * rmse(Precision.LOW)


def test_values_that_are_not_finite_are_refused_with_the_row():
    rows, cols = 4, 64
    values = weights(rows, cols)
    values[2 * cols + 5] = 0x7FC0  # NaN
    with pytest.raises(SliceError, match=r"cannot slice 'w': row 2 holds a value that is not finite"):
        quantize_tensor(values, rows, cols, SliceSpec(), Workers(2), name="w")
    values[2 * cols + 5] = 0xFF80  # -inf
    with pytest.raises(SliceError, match="row 2"):
        quantize_tensor(values, rows, cols, SliceSpec(), Workers(1), name="w")


def test_spec_parsing_and_layout():
    assert parse_slices("8:4") == SliceSpec(8, 4, 32)
    assert parse_slices(" 6:3/64 ") == SliceSpec(6, 3, 64)
    assert SliceSpec().label == "MAT(8,4)" and SliceSpec().bits_per_weight("msb") == 4.75
    assert SliceSpec().msb_nbytes(2, 64) == 64 + 3 * 4 and SliceSpec().lsb_nbytes(2, 64) == 64
    for bad in ("8", "4:8", "8:8", "9:4", "8:0", "8:4/12", "x"):
        with pytest.raises(SliceError):
            parse_slices(bad)
    with pytest.raises(SliceError, match="not a multiple of the group size 32"):
        SliceSpec().check_shape("w", (4, 48))
    with pytest.raises(SliceError, match="expected a 2-D weight"):
        SliceSpec().check_shape("w", (4, 4, 32))
    assert SliceSpec.from_config(SliceSpec(6, 3).get_config()) == SliceSpec(6, 3)
    with pytest.raises(FormatError, match="unknown scheme"):
        SliceSpec.from_config({**SliceSpec().get_config(), "scheme": "gptq"})
    with pytest.raises(FormatError, match="low bits < high bits"):
        SliceSpec.from_config({**SliceSpec().get_config(), "low_bits": 9})
