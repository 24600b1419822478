"""AMAT slices of expert tensors: quantize (pack), dequantize (serve, verify), and the Base baseline (eval).

The kernels live in `zipmoe.quant.kernels`; this module sizes the buffers, splits the rows over worker threads and
turns kernel status codes into errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zipmoe._threads import Workers
from zipmoe.quant.kernels import dequantize_slices, quantize_slices
from zipmoe.quant.spec import Precision, SliceError, SliceSpec

_TASK_VALUES = 1 << 18  # values per thread-pool task at least


@dataclass(frozen=True)
class MsbSlice:
    """The parts of one tensor's MSB slice payload (views into it)."""

    packed: np.ndarray  # uint8, rows * cols * bits / 8
    scales: np.ndarray  # uint16 BF16 patterns, one per group
    zero_points: np.ndarray  # uint8, one per group

    @classmethod
    def view(cls, payload: np.ndarray, n_values: int, bits: int, group: int) -> MsbSlice:
        """The parts of ``payload``, an MSB slice of ``n_values`` values of ``bits`` bits in groups of ``group``."""
        packed_nbytes = n_values * bits // 8
        groups = n_values // group
        scales = payload[packed_nbytes : packed_nbytes + 2 * groups].view("<u2")
        return cls(payload[:packed_nbytes], scales, payload[packed_nbytes + 2 * groups :])


def min_rows(cols: int) -> int:
    return max(1, _TASK_VALUES // max(1, cols))


def quantize_tensor(
    values: np.ndarray, rows: int, cols: int, spec: SliceSpec, workers: Workers, *, name: str = "tensor"
) -> tuple[np.ndarray, np.ndarray]:
    """The MSB and LSB slice payloads (uint8) of a BF16 tensor (uint16 patterns, ``rows * cols`` of them).

    Raises:
        SliceError: the tensor holds a value that is not finite, or values too large for a finite scale.
    """
    msb = np.empty(spec.msb_nbytes(rows, cols), np.uint8)
    lsb = np.empty(spec.lsb_nbytes(rows, cols), np.uint8)
    _quantize(values, rows, cols, spec.group_size, spec.high_bits, spec.low_bits, msb, lsb, workers, name)
    return msb, lsb


def _quantize(
    values: np.ndarray, rows: int, cols: int, group: int, high: int, low: int, msb: np.ndarray, lsb: np.ndarray,
    workers: Workers, name: str,
) -> MsbSlice:  # fmt: skip
    parts = MsbSlice.view(msb, rows * cols, low, group)
    values = values.reshape(-1)
    bad = workers.run_ranges(
        lambda a, b: quantize_slices(
            values, cols, group, high, low, a, b, parts.packed, lsb, parts.scales, parts.zero_points
        ),
        rows,
        min_rows(cols),
    )
    failed = [r for r in bad if r >= 0]
    if failed:
        raise SliceError(f"cannot slice {name!r}: row {min(failed)} holds a value that is not finite or too large")
    return parts


def slice_parts(
    msb: np.ndarray, lsb: np.ndarray | None, rows: int, cols: int, spec: SliceSpec, precision: Precision
) -> tuple[MsbSlice, np.ndarray]:
    """The parts of an MSB payload, and the LSB payload (empty when not given), checked for ``precision``."""
    lsb = lsb if lsb is not None else np.zeros(0, np.uint8)
    if precision == Precision.HIGH and lsb.size != spec.lsb_nbytes(rows, cols):
        raise ValueError("high precision needs the LSB slice")
    return MsbSlice.view(msb, rows * cols, spec.low_bits, spec.group_size), lsb


def dequantize_tensor(
    msb: np.ndarray,
    lsb: np.ndarray | None,
    rows: int,
    cols: int,
    spec: SliceSpec,
    precision: Precision,
    out: np.ndarray,
    workers: Workers,
) -> np.ndarray:
    """Float32 weights (``out``, ``rows * cols``) from an MSB slice payload and, for `Precision.HIGH`, the LSB one."""
    parts, lsb = slice_parts(msb, lsb, rows, cols, spec, precision)
    workers.run_ranges(
        lambda a, b: dequantize_slices(
            parts.packed, lsb, parts.scales, parts.zero_points, cols, spec.group_size, spec.high_bits,
            spec.low_bits, int(precision), a, b, out,
        ),
        rows,
        min_rows(cols),
    )  # fmt: skip
    return out


def base_quantized(values: np.ndarray, rows: int, cols: int, bits: int, group: int, workers: Workers) -> np.ndarray:
    """Float32 weights of a BF16 tensor quantized on its own at ``bits`` (SliceMoE's "Base" baseline)."""
    msb = np.empty(rows * cols * bits // 8 + 3 * (rows * cols // group), np.uint8)
    empty = np.zeros(0, np.uint8)
    parts = _quantize(values, rows, cols, group, bits, bits, msb, empty, workers, "tensor")
    out = np.empty(rows * cols, np.float32)
    workers.run_ranges(
        lambda a, b: dequantize_slices(
            parts.packed, empty, parts.scales, parts.zero_points, cols, group, bits, bits, 0, a, b, out
        ),
        rows,
        min_rows(cols),
    )
    return out


def warm_up() -> None:
    """Compile, or load from numba's cache, the kernel variants that pack, verify, run and eval use."""
    from zipmoe.quant.matvec import matmul_slices  # it builds on this module

    spec = SliceSpec()
    values = np.arange(2 * 64, dtype=np.uint16)
    msb, lsb = quantize_tensor(values, 2, 64, spec, Workers(1))
    for precision in Precision:
        dequantize_tensor(msb, lsb, 2, 64, spec, precision, np.empty(2 * 64, np.float32), Workers(1))
    matmul_slices(np.zeros((1, 64), np.float32), msb, lsb, 2, 64, spec, Precision.HIGH, Workers(1))
    base_quantized(values, 2, 64, spec.low_bits, spec.group_size, Workers(1))
