"""How the runtime reads bytes from the container file: buffered or direct I/O, optionally at a simulated bandwidth.

Modes (``--io``):

- ``buffered``: positioned reads (``os.preadv``) through the page cache, with ``POSIX_FADV_RANDOM`` so that the
  kernel does not read ahead into neighbouring records.
- ``direct``: ``O_DIRECT`` reads that bypass the page cache. The kernel wants the file offset, the length and the
  memory address of such reads to be multiples of the device's logical block size. We use ``alignment`` = 4096 (at
  least the logical block size of every common device: 512-byte and 4 KiB sectors), or the filesystem's block size
  (``os.statvfs().f_bsize``) when that is a larger power of two of at most 64 KiB. A read of ``[offset, offset +
  nbytes)`` becomes one read of the enclosing aligned range into an aligned buffer, and the caller gets a view of
  exactly the bytes it asked for. If the filesystem refuses ``O_DIRECT`` (``EINVAL`` when opening, or on the first
  read), reads go through the page cache instead and `Storage.warning` says so in one line, for the CLI to print.

``--storage GBPS`` (either mode) models a storage device of that bandwidth on a machine whose page cache
holds the container: every read still happens, and then waits until a device serving reads one after another at
GBPS (10^9 bytes per second) would have delivered the bytes the read transferred. It simulates transfer time only
(no seek latency, no queue depth).

Accounting (`Storage.stats`, `Storage.snapshot`) is thread-safe: ``bytes_read`` counts the bytes callers asked for,
``device_bytes`` the bytes transferred (with direct I/O's rounding to whole blocks), ``reads`` the read requests
issued, and ``busy_seconds`` the union of the intervals during which at least one read was in flight (the device was
busy), simulated wait included. `Storage.busy_fraction` turns two snapshots into the busy fraction of an interval.
"""

from __future__ import annotations

import errno
import math
import operator
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from zipmoe.errors import ZipmoeError

IO_MODES = ("buffered", "direct")
MIN_GBPS = 1e-3
DIRECT_ALIGNMENT = 4096
MAX_ALIGNMENT = 64 * 1024


class StorageError(ZipmoeError, OSError):
    """Reading the container file failed: it cannot be opened, a read failed or ended early, the range is outside it.

    Also an `OSError`; ``errno`` is set when an operating-system error is the cause.
    """

    def __str__(self) -> str:  # the message alone, also when errno is set
        return str(self.args[0]) if self.args else ""


class StorageValueError(StorageError, ValueError):
    """A storage option or a read range is invalid (unknown mode, bad bandwidth, negative or out-of-file range)."""


def _storage_error(message: str, cause: OSError | None = None) -> StorageError:
    exc = StorageError(message)
    if cause is not None:
        exc.errno = cause.errno
        exc.strerror = cause.strerror
    return exc


@dataclass(frozen=True)
class StorageStats:
    """An immutable copy of a `Storage`'s counters at time ``at`` (``time.perf_counter()``)."""

    bytes_read: int  # bytes requested by callers
    device_bytes: int  # bytes transferred, including direct I/O's rounding to whole blocks
    reads: int  # read requests issued
    busy_seconds: float  # union of the intervals with at least one read in flight (simulated waits included)
    at: float


class _Throttle:
    """A storage device of ``rate`` bytes per second that serves reads one after another."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0

    def transfer(self, nbytes: int, issued: float) -> None:
        """Block until a read of ``nbytes`` issued at ``issued`` (a `time.perf_counter` value) would have completed.

        The device starts on a request when it is issued (or when it has finished the ones before), as a DMA
        transfer would: the copy from the page cache that really happens meanwhile is hidden in the simulated time.
        """
        with self._lock:
            self._free_at = max(issued, self._free_at) + nbytes / self.rate
            done = self._free_at
        delay = done - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def _round_down(n: int, a: int) -> int:
    return n - n % a


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _address(buf: np.ndarray) -> int:
    return buf.__array_interface__["data"][0]


def _filesystem_alignment(path: str) -> int:
    try:
        bsize = os.statvfs(path).f_bsize
    except (OSError, AttributeError):
        return DIRECT_ALIGNMENT
    if DIRECT_ALIGNMENT < bsize <= MAX_ALIGNMENT and bsize & (bsize - 1) == 0:
        return bsize
    return DIRECT_ALIGNMENT


class Storage:
    """Positioned reads of one file, buffered or direct, optionally at a simulated bandwidth; thread-safe.

    Args:
        path: the file.
        io: ``"buffered"`` or ``"direct"`` (see the module docstring). `io` is the mode in use after a fallback.
        gbps: simulated storage bandwidth in GB/s (10^9 bytes per second), finite and at least 0.001; None for none.
        pinned: buffers come from pinned (page-locked) host memory, so copies from them to a CUDA device run
            asynchronously (imports torch).

    Attributes:
        path, size: the file and its size in bytes (at open).
        io: the mode actually used.
        warning: a one-line message when ``direct`` was asked for and the filesystem refused it, else None.
        alignment: the granularity of the buffer layout: a read of ``offset`` lands at ``offset % alignment`` in its
            buffer (see `span`). 1 in buffered mode; the direct-I/O alignment in direct mode, and still after a
            fallback at the first read (so that buffers handed out before it stay valid).
    """

    def __init__(
        self, path: str | os.PathLike, *, io: str = "buffered", gbps: float | None = None, pinned: bool = False
    ) -> None:
        self.path = os.fspath(path)
        if io not in IO_MODES:
            raise StorageValueError(f"unknown I/O mode {io!r} (choose {', '.join(IO_MODES)})")
        if gbps is not None:
            try:
                ok = math.isfinite(gbps) and gbps >= MIN_GBPS
            except TypeError:
                ok = False
            if not ok:
                raise StorageValueError(
                    f"--storage must be a finite bandwidth of at least {MIN_GBPS:g} GB/s, got {gbps!r}"
                )
        self.gbps = None if gbps is None else float(gbps)
        self.pinned = pinned
        self.io = io
        self.warning: str | None = None
        self.alignment = 1
        self._throttle = _Throttle(self.gbps * 1e9) if self.gbps is not None else None
        self._lock = threading.RLock()  # the fds and the mode (RLock: a failed open inside closes)
        self._fds: list[int] = []  # every fd opened, closed by close()
        self._mode: tuple[int, bool] = (-1, False)  # the fd that reads use, and whether it is O_DIRECT
        self._direct_ok = False  # a direct read has succeeded: EINVAL from now on is an error, not a refusal
        self._stats_lock = threading.Lock()
        self._bytes_read = 0
        self._device_bytes = 0
        self._reads = 0
        self._in_flight = 0
        self._busy_since = 0.0
        self._busy = 0.0
        if io == "direct":
            self._open_direct()
        if self._mode[0] < 0:
            self._open_buffered()
        try:
            self.size = os.fstat(self._mode[0]).st_size
        except OSError as exc:
            self.close()
            raise _storage_error(f"{self.path}: cannot stat ({exc.strerror})", exc) from None

    # ----------------------------------------------------------------------------------------------------- opening

    def _open(self, flags: int) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY | flags)
        except OSError as exc:
            self.close()
            raise _storage_error(f"{self.path}: cannot open ({exc.strerror})", exc) from None
        self._fds.append(fd)
        return fd

    def _open_buffered(self) -> int:
        fd = self._open(0)
        if hasattr(os, "posix_fadvise"):  # reads are random: no readahead into the neighbouring records
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:
                pass
        self._mode = (fd, False)
        return fd

    def _open_direct(self) -> None:
        flag = getattr(os, "O_DIRECT", None)
        if flag is None:
            self._refuse("this platform has no O_DIRECT")
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | flag)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                self.close()
                raise _storage_error(f"{self.path}: cannot open ({exc.strerror})", exc) from None
            self._refuse(f"the filesystem refuses O_DIRECT ({exc.strerror})")
            return
        self._fds.append(fd)
        self._mode = (fd, True)
        self.alignment = max(DIRECT_ALIGNMENT, _filesystem_alignment(self.path))

    def _refuse(self, why: str) -> None:
        self.io = "buffered"
        self.warning = f"{self.path}: {why}; reading through the page cache instead of --io direct"

    def _fall_back(self, fd: int, exc: OSError) -> tuple[int, bool]:
        """After EINVAL from a direct read on ``fd``: switch to buffered reads unless a direct read has worked."""
        with self._lock:
            if self._direct_ok:
                return fd, True  # direct reads work: the EINVAL is an error of this read
            if self._mode == (fd, True):  # the first thread here switches; the direct fd stays open till close()
                self._refuse(f"the filesystem refuses O_DIRECT reads ({exc.strerror})")
                self._open_buffered()
            return self._mode

    # ------------------------------------------------------------------------------------------------------ buffers

    def buffer(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer able to receive a read of ``nbytes`` at any offset in this mode; the caller slices it.

        Buffered mode: exactly ``nbytes`` bytes. Direct mode: ``round_up(nbytes, alignment) + alignment`` bytes
        (less than ``2 * alignment`` extra), starting at an aligned address, since a read lands at ``offset %
        alignment`` (see `span`) and the device transfers whole blocks around it. Pinned host memory if asked.
        """
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError(f"buffer size must be non-negative, got {nbytes}")
        a = self.alignment
        size = nbytes if a == 1 else _round_up(nbytes, a) + a
        extra = 0 if a == 1 else a  # room to move the start to an aligned address
        if self.pinned:
            import torch  # only for pinned memory: the module loads without torch

            raw = torch.empty(size + extra, dtype=torch.uint8, pin_memory=True).numpy()
        else:
            raw = np.empty(size + extra, np.uint8)
        start = (-_address(raw)) % a if a > 1 else 0
        return raw[start : start + size]

    def span(self, buf: np.ndarray, offset: int, nbytes: int) -> np.ndarray:
        """Where `read` (or `read_pieces`) of ``nbytes`` at file ``offset`` with ``out=buf`` puts the bytes."""
        head = offset % self.alignment
        return buf[head : head + nbytes]

    def _check_out(self, out: np.ndarray, needed: int) -> None:
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1:
            raise TypeError("out must be a 1-D uint8 numpy array from Storage.buffer()")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a contiguous, writable array from Storage.buffer()")
        if out.size < needed:
            raise ValueError(f"out holds {out.size} bytes; this read needs {needed} (use Storage.buffer())")
        if self.alignment > 1 and _address(out) % self.alignment:
            raise ValueError(f"out is not aligned to {self.alignment} bytes (use Storage.buffer())")

    # -------------------------------------------------------------------------------------------------------- reads

    def _check_range(self, offset: int, nbytes: int) -> tuple[int, int]:
        offset, nbytes = operator.index(offset), operator.index(nbytes)
        if offset < 0 or nbytes < 0:
            raise StorageValueError(f"{self.path}: invalid read of {nbytes} bytes at offset {offset}")
        if offset + nbytes > self.size:
            raise StorageValueError(
                f"{self.path}: cannot read {nbytes} bytes at offset {offset}: the file has {self.size} bytes"
            )
        return offset, nbytes

    def _layout(self, offset: int, nbytes: int) -> tuple[int, int]:
        """The file range ``[start, stop)`` that a read of ``nbytes`` at ``offset`` transfers into its buffer."""
        a = self.alignment
        return _round_down(offset, a), _round_up(offset + nbytes, a)

    def read(self, offset: int, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
        """Bytes ``[offset, offset + nbytes)`` of the file, read with one read request, as a uint8 view of exactly
        ``nbytes`` (into ``out`` when given, which must come from ``buffer(nbytes)``; a fresh buffer otherwise)."""
        offset, nbytes = self._check_range(offset, nbytes)
        start, stop = self._layout(offset, nbytes)
        if out is None:
            out = self.buffer(nbytes)
        else:
            self._check_out(out, stop - start)
        if nbytes:
            self._request(out, start, offset, start, stop, offset + nbytes, nbytes)
        return self.span(out, offset, nbytes)

    def read_pieces(self, offset: int, sizes: Sequence[int], out: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Read consecutive ranges of ``sizes`` bytes starting at ``offset``, one after another, yielding each as soon
        as it has arrived, so that a caller can decode one piece while the next is being read.

        The pieces are views into one buffer (``out`` when given, from ``buffer(sum(sizes))``) that ends up holding
        the whole range contiguously, at ``span(out, offset, sum(sizes))``. In direct mode each read covers the
        aligned blocks up to the end of its piece that earlier reads did not fetch, so a block that straddles two
        pieces is read once, with the first. The range is checked when called, not when first iterated.
        """
        sizes = [operator.index(s) for s in sizes]
        negative = [s for s in sizes if s < 0]
        if negative:
            raise StorageValueError(f"{self.path}: invalid piece size {negative[0]} in a read at offset {offset}")
        offset, total = self._check_range(offset, sum(sizes))
        start, stop = self._layout(offset, total)
        if out is None:
            out = self.buffer(total)
        else:
            self._check_out(out, stop - start)
        return self._pieces(out, offset, sizes, start, stop)

    def _pieces(self, out: np.ndarray, offset: int, sizes: list[int], start: int, stop: int) -> Iterator[np.ndarray]:
        a = self.alignment
        fetched = start  # the file bytes [start, fetched) are in out (out[0] holds file byte start)
        position = offset
        for size in sizes:
            end = position + size
            if end > fetched:
                target = min(_round_up(end, a), stop)
                fetched = self._request(out, start, max(fetched, position), fetched, target, end, size)
            elif size:
                self._account(size, 0, 0)
            yield out[position - start : end - start]
            position = end

    def _request(self, out: np.ndarray, base: int, offset: int, lo: int, hi: int, end: int, requested: int) -> int:
        """One read request for the caller's bytes ``[offset, end)``, into ``out`` where ``out[0]`` holds file byte
        ``base``. A direct read transfers the aligned range ``[lo, hi)``, which may run past the end of the file; a
        buffered one only ``[offset, end)``. ``requested`` is what the caller asked for (accounting).

        Returns the file position up to which ``out`` now holds the file from ``lo`` on: ``hi`` when the read got
        everything up to ``hi`` or the end of the file; less (``end`` or more) when a read came back short (buffered
        reads, or a file that shrank), rounded down to the alignment in direct mode so the next read can follow on.
        """
        fd, direct = self._mode
        if fd < 0:
            raise StorageError(f"{self.path}: read at offset {offset} after close")
        self._begin()
        issued = time.perf_counter()
        try:
            while True:
                try:
                    if direct:
                        transferred = self._pread(fd, out, base, lo, hi, end, offset, direct=True)
                        self._direct_ok = True
                        reached = lo + transferred
                        reached = hi if reached >= min(hi, self.size) else _round_down(reached, self.alignment)
                    else:
                        transferred = self._pread(fd, out, base, offset, end, end, offset, direct=False)
                        reached = end
                    break
                except StorageError:
                    raise
                except OSError as exc:
                    if direct and exc.errno == errno.EINVAL and not self._direct_ok:
                        fd, direct = self._fall_back(fd, exc)
                        if not direct:
                            continue
                    raise _storage_error(
                        f"{self.path}: read of {end - offset} bytes at offset {offset} failed ({exc.strerror})", exc
                    ) from None
            if self._throttle is not None:
                self._throttle.transfer(transferred, issued)
        finally:
            self._end()
        self._account(requested, transferred, 1)
        return reached

    def _pread(
        self, fd: int, out: np.ndarray, base: int, lo: int, hi: int, needed: int, offset: int, *, direct: bool
    ) -> int:
        """File bytes ``[lo, hi)`` into ``out[lo - base : hi - base]``; returns the bytes transferred, which may be
        fewer only at the end of the file, and must reach file position ``needed``."""
        view = memoryview(out)[lo - base : hi - base]
        done = 0
        while lo + done < hi:
            n = os.preadv(fd, [view[done:]], lo + done)
            done += n
            if n == 0 or (direct and n % self.alignment):  # end of file (a direct read cannot go on unaligned)
                break
        if lo + done < needed:
            raise StorageError(
                f"{self.path}: short read at offset {offset}: the file ends at byte {lo + done}, before byte {needed}"
            )
        return done

    # --------------------------------------------------------------------------------------------------- accounting

    def _begin(self) -> None:
        with self._stats_lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1

    def _end(self) -> None:
        with self._stats_lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._busy += time.perf_counter() - self._busy_since

    def _account(self, requested: int, transferred: int, reads: int) -> None:
        with self._stats_lock:
            self._bytes_read += requested
            self._device_bytes += transferred
            self._reads += reads

    def snapshot(self) -> StorageStats:
        """An immutable copy of the counters now (a read in flight counts as busy up to now)."""
        with self._stats_lock:
            now = time.perf_counter()
            busy = self._busy + (now - self._busy_since if self._in_flight else 0.0)
            return StorageStats(self._bytes_read, self._device_bytes, self._reads, busy, now)

    @property
    def stats(self) -> StorageStats:
        """The counters now: see `snapshot`."""
        return self.snapshot()

    @staticmethod
    def busy_fraction(start: StorageStats, end: StorageStats, wall_seconds: float | None = None) -> float:
        """The fraction of the interval between two snapshots during which the device was busy, in [0, 1].

        ``wall_seconds`` defaults to the time between the snapshots; 0.0 for an empty interval.
        """
        wall = end.at - start.at if wall_seconds is None else wall_seconds
        if wall <= 0:
            return 0.0
        return min(1.0, max(0.0, (end.busy_seconds - start.busy_seconds) / wall))

    # -------------------------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Close the file (idempotent). Reads after this raise `StorageError`."""
        with self._lock:
            fds, self._fds, self._mode = self._fds, [], (-1, False)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Storage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        sim = f", gbps={self.gbps:g}" if self.gbps is not None else ""
        return f"Storage({self.path!r}, io={self.io!r}{sim})"
