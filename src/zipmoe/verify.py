"""`verify`: prove a container is intact and decodes to exactly what was packed.

Checks, in order: the structure (header, manifest, record layout: done by opening), that alignment padding is all
zero bytes, every checksum of every chunk, that every tensor decodes to bytes whose SHA-256 is the recorded source
hash, and, given the source checkpoint, that every tensor equals the source tensor bit for bit. For a container
with AMAT slices, every expert tensor is also quantized again: its stored MSB and LSB slices must equal the result
byte for byte, and together dequantize to exactly the weights of quantizing it at the high bit width directly.
Every failure is recorded with the tensor, the chunk and the file offset; verification goes on past the first one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zipmoe._threads import Workers
from zipmoe.codecs.parts import check_part, decode_part
from zipmoe.errors import ZipmoeError
from zipmoe.formats.checkpoint import Checkpoint, open_checkpoint
from zipmoe.formats.constants import CLASS_EXPERT
from zipmoe.formats.manifest import Blob, TensorEntry
from zipmoe.formats.reader import Container, SmallTensor
from zipmoe.quant.amat import base_quantized, dequantize_tensor, quantize_tensor
from zipmoe.quant.spec import LSB, MSB, Precision, SliceError

_SCAN_BLOCK = 64 << 20


@dataclass
class VerifyReport:
    """What `verify` checked and what it found."""

    path: Path
    n_tensors: int = 0
    n_parts: int = 0
    n_chunks: int = 0
    n_files: int = 0
    n_slices: int = 0
    decoded_bytes: int = 0
    source: str | None = None  # the checkpoint compared against, if any
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "tensors": self.n_tensors,
            "parts": self.n_parts,
            "chunks": self.n_chunks,
            "files": self.n_files,
            "slices": self.n_slices,
            "decoded_bytes": self.decoded_bytes,
            "source": self.source,
            "failures": self.failures,
        }


def verify(
    path: Path,
    source: str | None = None,
    *,
    threads: int | None = None,
    progress_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify a container; see the module docstring.

    Args:
        path: the container.
        source: a checkpoint directory or Hub id to compare with bit for bit.
        threads: worker threads.
        progress_start: called once with the number of bytes to decode.
        progress: called with the number of bytes just decoded.

    Returns:
        A `VerifyReport`; ``report.ok`` is False when anything failed.

    Raises:
        FormatError: the container cannot be opened at all (bad magic, version, truncated, corrupt manifest).
        CheckpointError: ``source`` cannot be read.
    """
    report = VerifyReport(Path(path))
    progress = progress or (lambda n: None)
    checkpoint = open_checkpoint(source) if source is not None else None
    with Container(path) as container, Workers(threads) as workers:
        small = _small_tensors(container, report)
        if checkpoint is not None:
            report.source = checkpoint.source.describe()
            _compare_inventory(container, small, checkpoint, report)
        if progress_start:
            progress_start(sum(t.size for t in container.manifest.tensors))
        _check_padding(container, report)
        _check_files(container, report, workers)
        _check_small_tensors(container, small, checkpoint, report)
        buffer = np.empty(0, np.uint8)
        source_buffer = np.empty(0, np.uint8)
        slices = _SliceChecker(container, report, workers) if container.slice_spec is not None else None
        for t_index, tensor in enumerate(container.manifest.tensors):
            if buffer.size < tensor.size:
                buffer = np.empty(tensor.size, np.uint8)
                source_buffer = np.empty(tensor.size, np.uint8) if checkpoint else source_buffer
            out = buffer[: tensor.size]
            intact = _check_tensor(container, tensor, out, checkpoint, source_buffer, report, workers)
            if slices is not None and intact and tensor.tensor_class == CLASS_EXPERT:
                slices.check(t_index, tensor, out)
            progress(tensor.size)
    return report


def _small_tensors(container: Container, report: VerifyReport) -> dict[str, SmallTensor]:
    """The tensors kept in raw runs; none, with the failure reported, when the stored headers do not account for them."""
    try:
        return container.small_tensors
    except ZipmoeError as exc:
        report.failures.append(str(exc))
        return {}


def _compare_inventory(
    container: Container, small: dict[str, SmallTensor], checkpoint: Checkpoint, report: VerifyReport
) -> None:
    stored = set(container.tensors) | set(small)
    present = set(checkpoint.tensors)
    for name in sorted(present - stored)[:20]:
        report.failures.append(f"tensor {name!r}: in the source checkpoint but not in the container")
    for name in sorted(stored - present)[:20]:
        report.failures.append(f"tensor {name!r}: in the container but not in the source checkpoint")


def _check_padding(container: Container, report: VerifyReport) -> None:
    data = container.data
    for start, end in container.padding_ranges():
        for block in range(start, end, _SCAN_BLOCK):
            chunk = data[block : min(end, block + _SCAN_BLOCK)]
            nonzero = chunk.any()
            if nonzero:
                first = block + int(np.flatnonzero(chunk)[0])
                report.failures.append(f"padding: nonzero byte at file offset {first} (in padding {start}..{end - 1})")
            container.release(block, chunk.size)
            if nonzero:
                break


def _check_files(container: Container, report: VerifyReport, workers: Workers) -> None:
    raw = container.encodings[container.raw_encoding_index]
    for label, blob, encoding in container.manifest.blobs():
        if encoding is not None:  # tensor parts are checked with their tensor
            continue
        report.n_files += 1
        report.n_chunks += blob.n_chunks
        failures = check_part(container.data, container.blob_view(blob, raw), workers)
        report.failures += [f"{label}: {f.describe()}" for f in failures]
        if blob.sha256 is not None and not failures:
            data = container.read_blob(blob, label, check=False)
            if hashlib.sha256(data).hexdigest() != blob.sha256:
                report.failures.append(f"{label}: SHA-256 differs from the recorded one")
    for f in container.manifest.files:
        try:
            data = container.read_file(f.name)
        except ZipmoeError as exc:
            report.failures.append(str(exc))
            continue
        if hashlib.sha256(data).hexdigest() != f.sha256:
            report.failures.append(f"file {f.name!r}: SHA-256 differs from the recorded one")


def _check_small_tensors(
    container: Container, small: dict[str, SmallTensor], checkpoint: Checkpoint | None, report: VerifyReport
) -> None:
    """The tensors kept in raw runs (their bytes are checked with the runs): each equal to the source."""
    report.n_tensors += len(small)
    if checkpoint is None:
        return
    for name, tensor in small.items():
        if name not in checkpoint.tensors:
            continue
        file_index, source = checkpoint.tensors[name]
        expected = np.empty(source.nbytes, np.uint8)
        checkpoint.files[file_index].read_into(source.start, expected)
        try:
            stored = container.read_tensor(name)
        except ZipmoeError as exc:
            report.failures.append(str(exc))
            continue
        if (source.dtype, source.shape) != (tensor.dtype, tensor.shape) or not np.array_equal(expected, stored):
            report.failures.append(f"tensor {name!r}: differs from the source tensor")


def _check_tensor(
    container: Container,
    tensor: TensorEntry,
    out: np.ndarray,
    checkpoint: Checkpoint | None,
    source_buffer: np.ndarray,
    report: VerifyReport,
    workers: Workers,
) -> bool:
    """Check one tensor (decoded into ``out``); True when it decoded to the recorded SHA-256."""
    report.n_tensors += 1
    digest = hashlib.sha256()
    position = 0
    intact = True
    for index, blob in enumerate(tensor.parts):
        label = f"tensor {tensor.name!r}" + (f" part {index}" if tensor.fused else "")
        report.n_parts += 1
        report.n_chunks += blob.n_chunks
        view = container.part_view(tensor, index)
        failures = check_part(container.data, view, workers)
        if failures:
            report.failures += [f"{label}: {f.describe()}" for f in failures]
            intact = False
            position += blob.size
            continue
        part_out = out[position : position + blob.size]
        try:
            decode_part(container.data, view, part_out, workers, check=False)
        except ZipmoeError as exc:
            report.failures.append(f"{label}: {exc}")
            intact = False
        digest.update(part_out)
        container.release(blob.offset, blob.nbytes)
        if blob.plane is not None:
            container.release(blob.plane, blob.size // 2)
        position += blob.size
    report.decoded_bytes += position
    if not intact:
        return False
    if digest.hexdigest() != tensor.sha256:
        report.failures.append(f"tensor {tensor.name!r}: decoded bytes do not match the recorded source SHA-256")
        return False
    if checkpoint is not None and tensor.name in checkpoint.tensors:
        file_index, source = checkpoint.tensors[tensor.name]
        if source.dtype != tensor.dtype or source.shape != tensor.shape:
            report.failures.append(
                f"tensor {tensor.name!r}: source is {source.dtype} {list(source.shape)}, "
                f"container has {tensor.dtype} {list(tensor.shape)}"
            )
            return False
        expected = source_buffer[: source.nbytes]
        checkpoint.files[file_index].read_into(source.start, expected)
        if not np.array_equal(expected, out):
            report.failures.append(f"tensor {tensor.name!r}: {first_difference(expected, out, tensor.dtype)}")
            return False
    return True


class _SliceChecker:
    """Checks the AMAT slices of expert tensors against their (verified) decoded weights."""

    def __init__(self, container: Container, report: VerifyReport, workers: Workers) -> None:
        self.container = container
        self.spec = container.slice_spec
        self.report = report
        self.workers = workers
        self.raw = container.encodings[container.raw_encoding_index]
        self.blobs: dict[tuple[int, int, str], Blob] = {
            (t, p, r.kind): blob for r in container.manifest.slice_records for t, p, blob in r.members
        }

    def _stored(self, label: str, blob: Blob) -> np.ndarray | None:
        """A slice payload, its checksums checked (None, with the failures reported, when they do not match)."""
        self.report.n_slices += 1
        self.report.n_chunks += blob.n_chunks
        view = self.container.blob_view(blob, self.raw)
        failures = check_part(self.container.data, view, self.workers)
        if failures:
            self.report.failures += [f"{label}: {f.describe()}" for f in failures]
            return None
        payload = np.empty(blob.size, np.uint8)
        decode_part(self.container.data, view, payload, self.workers, check=False)
        self.container.release(blob.offset, blob.nbytes)
        return payload

    def check(self, t_index: int, tensor: TensorEntry, decoded: np.ndarray) -> None:
        part_nbytes = tensor.size // len(tensor.parts)
        for p in range(len(tensor.parts)):
            label = f"{tensor.name!r}" + (f" part {p}" if tensor.fused else "")
            values = decoded[p * part_nbytes : (p + 1) * part_nbytes].view(np.uint16)
            try:
                rows, cols = self.spec.check_shape(tensor.name, tensor.shape[1:] if tensor.fused else tensor.shape)
                expected = dict(zip((MSB, LSB), quantize_tensor(values, rows, cols, self.spec, self.workers)))
            except SliceError as exc:
                self.report.failures.append(f"slices of {label}: {exc}")
                continue
            stored = {}
            for kind in (MSB, LSB):
                blob = self.blobs[(t_index, p, kind)]
                payload = self._stored(f"{kind.upper()} slice of {label}", blob)
                if payload is None:
                    continue
                stored[kind] = payload
                if not np.array_equal(payload, expected[kind]):
                    first = int(np.flatnonzero(payload != expected[kind])[0])
                    self.report.failures.append(
                        f"{kind.upper()} slice of {label}: byte {first} differs from quantizing the weights again "
                        f"(file offset {blob.offset + blob.nbytes - blob.size + first})"
                    )
            if len(stored) == 2:
                self._check_recombined(label, stored[MSB], stored[LSB], values, rows, cols)

    def _check_recombined(
        self, label: str, msb: np.ndarray, lsb: np.ndarray, values: np.ndarray, rows: int, cols: int
    ) -> None:
        sliced = np.empty(rows * cols, np.float32)
        dequantize_tensor(msb, lsb, rows, cols, self.spec, Precision.HIGH, sliced, self.workers)
        direct = base_quantized(values, rows, cols, self.spec.high_bits, self.spec.group_size, self.workers)
        if not np.array_equal(sliced.view(np.uint32), direct.view(np.uint32)):
            index = int(np.flatnonzero(sliced.view(np.uint32) != direct.view(np.uint32))[0])
            self.report.failures.append(
                f"slices of {label}: MSB+LSB dequantize to {sliced[index]!r} at element {index}, "
                f"the {self.spec.high_bits}-bit weight is {direct[index]!r}"
            )


def first_difference(expected: np.ndarray, got: np.ndarray, dtype: str) -> str:
    """Describe the first differing element of two byte buffers (as 16-bit words for 16-bit dtypes)."""
    width = 2 if dtype in ("BF16", "F16", "I16", "U16") and expected.size % 2 == 0 else 1
    a = expected.view(np.uint16 if width == 2 else np.uint8)
    b = got.view(np.uint16 if width == 2 else np.uint8)
    index = int(np.flatnonzero(a != b)[0])
    bits = bin(int(a[index]) ^ int(b[index])).count("1")
    digits = 2 * width
    return (
        f"differs from the source at element {index}: expected 0x{int(a[index]):0{digits}x}, "
        f"got 0x{int(b[index]):0{digits}x} ({bits} bit{'s' if bits != 1 else ''} differ)"
    )
