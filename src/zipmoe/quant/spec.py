"""What an AMAT slice configuration is, and the byte layout of one expert tensor's MSB and LSB slices.

AMAT (SliceMoE, section 4.2) quantizes a weight matrix once, at ``high_bits``, in groups of ``group_size`` values
along its input (last) axis, asymmetrically: one BF16 scale and one ``high_bits`` zero-point per group. The top
``low_bits`` of every value form the MSB slice, the remaining ``shift = high_bits - low_bits`` bits the LSB slice::

    q (high_bits)      = [ msb (low_bits) | lsb (shift bits) ]
    low-bit weight     = ((q >> shift) - (zp >> shift)) * scale * 2**shift      (MSB slice alone)
    high-bit weight    = (q - zp) * scale                                       (MSB and LSB slices)

Truncating the zero-point together with the value is what keeps the low-bit weights centred (the paper's point);
`Precision.TRUNC` keeps the high-bit zero-point instead, the naive truncation the paper compares against.

Slice payloads of a ``[rows, cols]`` tensor (``groups = cols / group_size`` per row)::

    MSB:  [rows * cols * low_bits / 8: packed MSB values][rows * groups * 2: scales, BF16][rows * groups: zero-points]
    LSB:  [rows * cols * shift / 8: packed LSB values]

Values are packed eight at a time into ``bits`` bytes: value ``i`` of eight occupies bits ``bits*i .. bits*i+bits-1``
of the little-endian integer those bytes form (for 4 bits: low nibble first).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from zipmoe.errors import FormatError, ZipmoeError

DEFAULT_GROUP_SIZE = 32
MSB, LSB = "msb", "lsb"  # slice kinds
SLICE_KINDS = (MSB, LSB)


class SliceError(ZipmoeError, ValueError):
    """A slice configuration, or a tensor that cannot be sliced with it."""


class Precision(enum.IntEnum):
    """How to turn slices into weights (the ids are the dequantization kernel's ``mode`` argument)."""

    HIGH = 0  # MSB and LSB: the high-bit weights
    LOW = 1  # MSB alone, zero-point truncated with the values (AMAT)
    TRUNC = 2  # MSB alone, high-bit zero-point kept (naive truncation; a baseline, not for serving)


@dataclass(frozen=True)
class SliceSpec:
    """An AMAT configuration ``MAT(high_bits, low_bits)`` with groups of ``group_size`` values.

    Raises:
        SliceError: bits outside ``1 <= low_bits < high_bits <= 8``, or a group size that is not a positive
            multiple of 8.
    """

    high_bits: int = 8
    low_bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    scheme: ClassVar[str] = "amat"

    def __post_init__(self) -> None:
        if not 1 <= self.low_bits < self.high_bits <= 8:
            raise SliceError(f"slices need 1 <= low bits < high bits <= 8, got {self.high_bits}:{self.low_bits}")
        if self.group_size <= 0 or self.group_size % 8:
            raise SliceError(f"slice group size must be a positive multiple of 8, got {self.group_size}")

    @property
    def shift(self) -> int:
        return self.high_bits - self.low_bits

    @property
    def label(self) -> str:
        return f"MAT({self.high_bits},{self.low_bits})"

    def check_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(rows, cols)`` of an expert tensor part; raises `SliceError` for shapes this spec cannot slice."""
        if len(shape) != 2:
            raise SliceError(f"cannot slice {name!r}: expected a 2-D weight per expert, got shape {list(shape)}")
        rows, cols = shape
        if cols % self.group_size:
            raise SliceError(
                f"cannot slice {name!r}: its input dimension {cols} is not a multiple of the group size "
                f"{self.group_size}"
            )
        return rows, cols

    def msb_nbytes(self, rows: int, cols: int) -> int:
        groups = rows * cols // self.group_size
        return rows * cols * self.low_bits // 8 + 3 * groups

    def lsb_nbytes(self, rows: int, cols: int) -> int:
        return rows * cols * self.shift // 8

    def slice_nbytes(self, kind: str, rows: int, cols: int) -> int:
        return self.msb_nbytes(rows, cols) if kind == MSB else self.lsb_nbytes(rows, cols)

    def bits_per_weight(self, kind: str) -> float:
        """Stored bits per weight of one slice kind (scales and zero-points count with the MSB slice)."""
        return self.low_bits + 24 / self.group_size if kind == MSB else float(self.shift)

    def mode_names(self) -> dict[str, Precision]:
        """The uniform-precision run modes this spec offers: ``q8``/``q4`` for MAT(8,4)."""
        return {f"q{self.high_bits}": Precision.HIGH, f"q{self.low_bits}": Precision.LOW}

    def get_config(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "high_bits": self.high_bits,
            "low_bits": self.low_bits,
            "group_size": self.group_size,
            "scale_dtype": "BF16",
        }

    @classmethod
    def from_config(cls, config: Any) -> SliceSpec:
        expected = {"scheme", "high_bits", "low_bits", "group_size", "scale_dtype"}
        if not isinstance(config, dict) or set(config) - {"records"} != expected:
            keys = sorted(config) if isinstance(config, dict) else config
            raise FormatError(f"slices: expected keys {sorted(expected)}, got {keys}")
        if config["scheme"] != cls.scheme or config["scale_dtype"] != "BF16":
            raise FormatError(f"slices: unknown scheme {config['scheme']!r} / scale dtype {config['scale_dtype']!r}")
        values = [config[k] for k in ("high_bits", "low_bits", "group_size")]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise FormatError(f"slices: bits and group size must be integers, got {values}")
        try:
            return cls(*values)
        except SliceError as exc:
            raise FormatError(f"slices: {exc}") from None


def parse_slices(text: str) -> SliceSpec:
    """``8:4`` (MAT(8,4)), ``6:3``, ``4:2``; an optional ``/G`` sets the group size (``8:4/64``)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*(?:/\s*(\d+))?\s*", text)
    if m is None:
        raise SliceError(f"cannot read slices {text!r} (expected HIGH:LOW bits, e.g. 8:4, 6:3 or 4:2)")
    group = int(m[3]) if m[3] else DEFAULT_GROUP_SIZE
    return SliceSpec(int(m[1]), int(m[2]), group)
