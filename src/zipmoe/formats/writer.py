"""Writing a container: an explicit state machine that publishes atomically.

Bytes go to ``OUT.partial``, held under an exclusive lock (`zipmoe._partial`): a second writer of the same output
is refused, and what an interrupted run left is overwritten by the next. `ContainerWriter.finish` writes the
manifest, then the header with its magic still zero, fsyncs, lets the caller check the finished file, and only
then writes the magic and renames the file to ``OUT``: a partial file, wherever it was interrupted, never has the
magic of a container. Padding is always zero bytes, so the same input gives the
same file. Record bytes are written by a background thread, one record behind the caller, so writing overlaps
the encoding of the next record while memory holds at most two records.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from zipmoe._partial import fsync_dir, open_locked, partial_path
from zipmoe.codecs.checksum import checksum
from zipmoe.errors import OutputError
from zipmoe.formats.constants import DEFAULT_ALIGNMENT, HEADER_NBYTES, MAGIC, PART_ALIGNMENT
from zipmoe.formats.header import FileHeader
from zipmoe.formats.manifest import Manifest


class WriterState(enum.Enum):
    DATA = "data"  # writing records
    RECORD = "record"  # inside an expert or slice record
    PLANES = "planes"  # inside the sign-mantissa section of a split expert record
    FINISHED = "finished"
    ABORTED = "aborted"


class ContainerWriter:
    """Write records, then the manifest and header; publish with a rename.

    Args:
        path: the container to create.
        alignment: record alignment in bytes (a power of two, at least 64).
    """

    def __init__(self, path: Path, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if alignment < PART_ALIGNMENT or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two >= {PART_ALIGNMENT}, got {alignment}")
        self.path = path
        self.tmp_path = partial_path(path)
        self.alignment = alignment
        fd = open_locked(self.tmp_path, directory=False)
        try:
            os.ftruncate(fd, 0)  # what an interrupted run left
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"cannot write {self.tmp_path}: {exc.strerror or exc}") from None
        self._file = os.fdopen(fd, "wb")
        self._position = 0
        self._record_start = 0
        self._io = ThreadPoolExecutor(1, thread_name_prefix="zipmoe-write")
        self._pending: Future[None] | None = None
        self.state = WriterState.DATA
        self._write(bytes(HEADER_NBYTES))  # the header is written last

    # -- low level ------------------------------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview | np.ndarray) -> None:
        """Queue ``data`` (which the caller must not modify afterwards) behind the write in flight."""
        view = memoryview(data).cast("B")
        self._drain()
        self._pending = self._io.submit(self._file.write, view)
        self._position += view.nbytes

    def _drain(self) -> None:
        """Wait for the write in flight; report its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except OSError as exc:
                raise OutputError(f"cannot write {self.tmp_path}: {exc.strerror or exc}") from None

    def _pad_to(self, alignment: int) -> None:
        pad = -self._position % alignment
        if pad:
            self._write(bytes(pad))

    def _expect(self, *states: WriterState) -> None:
        if self.state not in states:
            raise RuntimeError(
                f"container writer: expected state {'/'.join(s.value for s in states)}, got {self.state.value}"
            )

    # -- records ----------------------------------------------------------------------------------------------------

    def write_record(self, data: np.ndarray) -> int:
        """Write one top-level record (a dense part, a file) at the next aligned offset; return the offset."""
        self._expect(WriterState.DATA)
        self._pad_to(self.alignment)
        offset = self._position
        self._write(data)
        return offset

    def begin_record(self) -> None:
        """Start an expert or slice record: the parts written until `end_record` are contiguous."""
        self._expect(WriterState.DATA)
        self._pad_to(self.alignment)
        self._record_start = self._position
        self.state = WriterState.RECORD

    def write_part(self, *pieces: np.ndarray) -> int:
        """Write one part of the current record (or of its sign-mantissa section): ``pieces`` back to back at the
        next 64-byte aligned offset; return that offset."""
        self._expect(WriterState.RECORD, WriterState.PLANES)
        self._pad_to(PART_ALIGNMENT)
        offset = self._position
        for piece in pieces:
            if piece.size:
                self._write(piece)
        return offset

    def begin_planes(self) -> int:
        """Start the sign-mantissa section of a split expert record at the next aligned offset; return it."""
        self._expect(WriterState.RECORD)
        self._pad_to(self.alignment)
        self.state = WriterState.PLANES
        return self._position

    def end_record(self) -> tuple[int, int]:
        """Close the current record; return its (offset, nbytes)."""
        self._expect(WriterState.RECORD, WriterState.PLANES)
        self.state = WriterState.DATA
        return self._record_start, self._position - self._record_start

    # -- publishing -------------------------------------------------------------------------------------------------

    def finish(self, manifest: Manifest, check: Callable[[Path], None] | None = None) -> Path:
        """Write manifest and header (magic zero), fsync, run ``check(tmp_path)``, write the magic, rename.

        ``check`` opens the file with ``Container(path, unpublished=True)``. If it raises, nothing is published and
        the partial file is removed.
        """
        self._expect(WriterState.DATA)
        self._pad_to(self.alignment)
        manifest_offset = self._position
        manifest_bytes = manifest.to_json_bytes()
        self._write(manifest_bytes)
        header = FileHeader(
            alignment=self.alignment,
            file_nbytes=self._position,
            manifest_offset=manifest_offset,
            manifest_nbytes=len(manifest_bytes),
            manifest_xxh64=checksum(manifest_bytes),
            format_version=manifest.format_version,
        )
        try:
            self._drain()
            self._io.shutdown(wait=True)
            self._write_at(0, bytes(len(MAGIC)) + header.pack()[len(MAGIC) :])
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write {self.tmp_path}: {exc.strerror or exc}") from None
        try:
            if check is not None:
                check(self.tmp_path)
            self._write_at(0, MAGIC)
            os.replace(self.tmp_path, self.path)  # still locked: the lock moves with the file
            fsync_dir(self.path.parent)
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            self.abort()
            raise
        self.state = WriterState.FINISHED
        self._file.close()
        return self.path

    def _write_at(self, offset: int, data: bytes) -> None:
        self._file.seek(offset)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def abort(self) -> None:
        """Close and delete the partial file (idempotent)."""
        if self.state is WriterState.FINISHED:
            return
        self.state = WriterState.ABORTED
        self._io.shutdown(wait=True, cancel_futures=True)
        try:  # removed while still locked, so that no other writer can have opened it meanwhile
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - nothing better to do while failing
            raise OutputError(f"cannot remove {self.tmp_path}: {exc.strerror or exc}") from None
        finally:
            try:
                self._file.close()
            except OSError:
                pass

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self.state not in (WriterState.FINISHED, WriterState.ABORTED):
            self.abort()
