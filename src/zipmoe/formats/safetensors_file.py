"""Read safetensors files without a framework: parse the header, then read tensor bytes into reusable buffers.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``), then the data region; offsets are relative to the data
region. numpy has no BF16, so we never ask a library to build arrays: BF16 bytes are handed on as ``uint16``.
Reading with ``preadv`` into one buffer (instead of mapping the file) keeps the memory of `pack` bounded by the
largest tensor, whatever the size of the checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zipmoe._json import load_json
from zipmoe.errors import CheckpointError
from zipmoe.formats.constants import MAX_DIMENSION, MAX_NDIM

MAX_HEADER_NBYTES = 100_000_000  # as the safetensors reference implementation

# Bits per element of every dtype the safetensors specification names.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this dtype and shape takes, or None for a dtype we do not know."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        return None
    numel = 1
    for d in shape:
        numel *= d
    return (numel * bits + 7) // 8


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a safetensors file; ``start`` is its absolute offset in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass
class SafetensorsFile:
    """A parsed safetensors file."""

    path: Path
    nbytes: int
    header_nbytes: int  # 8 + N: the bytes before the data region
    metadata: dict[str, str] | None
    tensors: list[SourceTensor]  # in data-offset order
    gaps: list[tuple[int, int]] = field(default_factory=list)  # absolute [start, end) not covered by any tensor

    @property
    def name(self) -> str:
        return self.path.name

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Fill ``out`` (uint8) with the file's bytes from absolute offset ``start``."""
        read_exact(self.path, start, out)


def read_exact(path: Path, start: int, out: np.ndarray) -> None:
    """Read ``out.size`` bytes of ``path`` at ``start`` into ``out`` (uint8, contiguous)."""
    view = memoryview(out).cast("B")
    done = 0
    try:
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            while done < view.nbytes:
                n = os.preadv(fd, [view[done:]], start + done)
                if n == 0:
                    raise CheckpointError(
                        f"{path}: file ends at {start + done}, expected {view.nbytes - done} more bytes"
                    )
                done += n
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _corrupt(path: Path, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt safetensors header: {message}")


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse and validate the header of a safetensors file.

    Raises:
        CheckpointError: the file cannot be read, or its header is malformed (named precisely).
    """
    try:
        with open(path, "rb") as f:
            file_nbytes = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {file_nbytes} bytes, too short for the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_NBYTES:
                raise _corrupt(path, f"header length {n} exceeds the {MAX_HEADER_NBYTES}-byte limit")
            if 8 + n > file_nbytes:
                raise _corrupt(path, f"header length {n} exceeds the file size {file_nbytes}")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_safetensors_header(path, raw, file_nbytes)


def parse_safetensors_header(path: Path, raw: bytes, file_nbytes: int) -> SafetensorsFile:
    """Parse and validate the JSON header ``raw`` (the ``N`` bytes after the length) of a ``file_nbytes`` file.

    Raises:
        CheckpointError: the header is malformed (named precisely, ``path`` in the message).
    """
    n = len(raw)
    header = load_json(raw, lambda reason: _corrupt(path, f"header is {reason}"))
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not an object")
    data_start = 8 + n
    data_nbytes = file_nbytes - data_start
    tensors = [_parse_entry(path, name, entry, data_start, data_nbytes) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.start, t.nbytes, t.name))
    gaps = []
    position = data_start
    for t in tensors:
        if t.start < position:
            raise _corrupt(path, f"tensor {t.name!r} overlaps the tensor before it")
        if t.start > position:
            gaps.append((position, t.start))
        position = t.start + t.nbytes
    if position < file_nbytes:
        gaps.append((position, file_nbytes))
    return SafetensorsFile(path, file_nbytes, data_start, metadata, tensors, gaps)


def _parse_entry(path: Path, name: str, entry: Any, data_start: int, data_nbytes: int) -> SourceTensor:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise _corrupt(path, f"tensor {name!r} has no dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DIMENSION for d in shape)
    ):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_nbytes
    ):
        raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r} outside the {data_nbytes}-byte data region")
    nbytes = offsets[1] - offsets[0]
    expected = tensor_nbytes(dtype, tuple(shape))
    if expected is not None and expected != nbytes:
        raise _corrupt(path, f"tensor {name!r}: {dtype} {shape} needs {expected} bytes, data_offsets give {nbytes}")
    return SourceTensor(name, dtype, tuple(shape), data_start + offsets[0], nbytes)
