"""zipmoe.runtime.storage: buffered and direct reads, O_DIRECT fallback, simulated bandwidth, accounting."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from zipmoe.errors import ZipmoeError
from zipmoe.runtime.storage import IO_MODES, Storage, StorageError, StorageValueError

SIZE = 3 * 4096 * 4 + 1234  # not a multiple of the alignment: rounded-up reads run past the end of the file


def make_file(directory: Path, size: int = SIZE, seed: int = 0) -> tuple[Path, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = directory / "data.bin"
    path.write_bytes(data)
    return path, data


def ranges(size: int, n: int = 60, seed: int = 1) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = [(0, size), (0, 0), (size, 0), (size - 1, 1), (size - 5000, 5000), (4096, 4096), (4095, 2), (1, 8191)]
    for _ in range(n):
        offset = rng.randrange(size)
        out.append((offset, rng.randrange(size - offset + 1)))
    for _ in range(n):  # small ones, some inside one block, some across a boundary
        offset = rng.randrange(size - 300)
        out.append((offset, rng.randrange(300)))
    return out


def split(total: int, rng: random.Random) -> list[int]:
    sizes = []
    while total > 0:
        s = min(total, rng.choice([0, 1, 7, 100, 4095, 4096, 4097, 10_000]))
        sizes.append(s)
        total -= s
    return sizes


@pytest.fixture
def file(tmp_path: Path) -> tuple[Path, bytes]:
    return make_file(tmp_path)


@pytest.fixture
def refuse_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses O_DIRECT at open (as tmpfs did before Linux 6.6)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def assert_consistent_mode(s: Storage) -> None:
    if s.io == "direct":
        assert s.warning is None and s.alignment >= 4096 and s.alignment % 4096 == 0
    else:
        assert s.warning is not None and "\n" not in s.warning and s.path in s.warning


@pytest.mark.parametrize("io", IO_MODES)
def test_reads_return_the_file_bytes(file, io):
    path, data = file
    with Storage(path, io=io) as s:
        assert s.size == len(data)
        if io == "direct":
            assert_consistent_mode(s)
        for offset, n in ranges(len(data)):
            got = s.read(offset, n)
            assert got.dtype == np.uint8 and got.shape == (n,)
            assert got.tobytes() == data[offset : offset + n], (offset, n)
            buf = s.buffer(n)
            got = s.read(offset, n, out=buf)
            assert got.tobytes() == data[offset : offset + n], (offset, n)
            assert np.shares_memory(got, buf) or n == 0
            assert s.span(buf, offset, n).tobytes() == data[offset : offset + n]


@pytest.mark.parametrize("io", IO_MODES)
def test_buffer_room(file, io):
    path, _ = file
    with Storage(path, io=io) as s:
        for n in (0, 1, 4095, 4096, 4097, 100_000):
            buf = s.buffer(n)
            assert buf.dtype == np.uint8 and buf.ndim == 1 and buf.flags.c_contiguous
            a = s.alignment
            if a == 1:
                assert buf.size == n
            else:
                assert buf.size < n + 2 * a
                assert buf.__array_interface__["data"][0] % a == 0
                for offset in (0, 1, a - 1):  # the worst case: a read starting just before a block boundary
                    assert offset % a + n <= buf.size
                    assert -(-(offset % a + n) // a) * a <= buf.size


@pytest.mark.parametrize("io", IO_MODES)
def test_read_pieces(file, io):
    path, data = file
    rng = random.Random(2)
    with Storage(path, io=io) as s:
        for offset, total in ranges(len(data), n=25, seed=3):
            sizes = split(total, rng)
            out = s.buffer(total) if rng.random() < 0.5 else None
            before = s.snapshot()
            pieces = s.read_pieces(offset, sizes, out=out)
            assert s.snapshot().reads == before.reads  # nothing is read before the first piece is asked for
            position = offset
            got = []
            for size, piece in zip(sizes, pieces, strict=True):
                assert piece.tobytes() == data[position : position + size], (offset, sizes, position)
                got.append(piece)
                position += size
            assert position == offset + total
            after = s.snapshot()
            assert after.bytes_read - before.bytes_read == total
            if s.alignment == 1:
                assert after.device_bytes - before.device_bytes == total
            else:  # every block of the aligned super-range transferred once, none twice
                a = s.alignment
                start, stop = offset - offset % a, min(-(-(offset + total) // a) * a, len(data))
                assert after.device_bytes - before.device_bytes == (stop - start if total else 0)
            if out is not None:
                assert s.span(out, offset, total).tobytes() == data[offset : offset + total]
                assert all(np.shares_memory(p, out) for p in got if p.size)


@pytest.mark.parametrize("io", IO_MODES)
def test_read_pieces_reads_one_piece_at_a_time(file, io):
    path, data = file
    with Storage(path, io=io) as s:
        sizes = [10_000, 10_000, 10_000]
        pieces = s.read_pieces(100, sizes)
        for i, piece in enumerate(pieces, 1):
            assert s.stats.reads == i  # the next piece is not read before this one is handed out
            assert piece.tobytes() == data[100 + (i - 1) * 10_000 : 100 + i * 10_000]


def test_direct_falls_back_when_open_refuses_o_direct(file, refuse_o_direct):
    path, data = file
    with Storage(path, io="direct") as s:
        assert s.io == "buffered" and s.alignment == 1
        assert s.warning is not None and "\n" not in s.warning and str(path) in s.warning and "O_DIRECT" in s.warning
        assert s.read(5, 10_000).tobytes() == data[5:10_005]
    with Storage(path, io="buffered") as s:
        assert s.warning is None


def test_direct_falls_back_when_the_first_read_refuses(file, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    path, data = file
    direct_fds = set()
    real_open, real_preadv = os.open, os.preadv

    def spy_open(p, flags, *args, **kwargs):
        fd = real_open(p, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_preadv(fd, buffers, offset, *args):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "preadv", refusing_preadv)
    with Storage(path, io="direct") as s:
        if s.io != "direct":
            pytest.skip("this filesystem refuses O_DIRECT at open")
        early = s.buffer(5000)  # handed out before the fallback: must stay usable
        assert s.read(4000, 5000, out=early).tobytes() == data[4000:9000]
        assert s.io == "buffered" and s.warning is not None and "\n" not in s.warning
        assert [p.tobytes() for p in s.read_pieces(3, [10, 5000, 7])] == [data[3:13], data[13:5013], data[5013:5020]]
        assert s.stats.device_bytes == s.stats.bytes_read  # buffered reads transfer only what was asked


def test_einval_after_a_working_direct_read_is_an_error(file, monkeypatch):
    path, data = file
    with Storage(path, io="direct") as s:
        if s.io != "direct":
            pytest.skip("this filesystem refuses O_DIRECT at open")
        if s.read(0, 10).tobytes() != data[:10] or s.io != "direct":
            pytest.skip("this filesystem refuses O_DIRECT reads")

        def failing(*args):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

        monkeypatch.setattr(os, "preadv", failing)
        with pytest.raises(StorageError, match="offset 77") as info:
            s.read(77, 10)
        assert s.io == "direct" and s.warning is None
        assert "\n" not in str(info.value) and str(path) in str(info.value) and info.value.errno == errno.EINVAL


def test_direct_on_dev_shm_works_or_falls_back():
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    directory = shm / f"zipmoe-test-{os.getpid()}-{threading.get_ident()}"
    directory.mkdir()
    try:
        path, data = make_file(directory, seed=4)
        with Storage(path, io="direct") as s:  # tmpfs refuses O_DIRECT before Linux 6.6, accepts it after
            assert_consistent_mode(s)
            for offset, n in ranges(len(data), n=10):
                assert s.read(offset, n).tobytes() == data[offset : offset + n]
            assert_consistent_mode(s)
    finally:
        for p in directory.iterdir():
            p.unlink()
        directory.rmdir()


def test_direct_in_the_test_directory_works_or_falls_back(file):
    path, data = file
    with Storage(path, io="direct") as s:
        assert_consistent_mode(s)
        assert s.read(1, len(data) - 1).tobytes() == data[1:]
        assert_consistent_mode(s)


@pytest.mark.parametrize("io", IO_MODES)
def test_simulated_bandwidth_bounds_the_read_time(file, io):
    path, data = file
    gbps = 1e-3  # 1 MB/s: 20 kB take 20 ms
    with Storage(path, io=io, gbps=gbps) as s:
        t0 = time.perf_counter()
        assert s.read(100, 20_000).tobytes() == data[100:20_100]
        assert s.read(30_000, 10_000).tobytes() == data[30_000:40_000]  # the device serves reads one after another
        elapsed = time.perf_counter() - t0
        stats = s.stats
        assert elapsed >= stats.device_bytes / (gbps * 1e9) >= 30_000 / (gbps * 1e9)
        assert stats.busy_seconds >= 0.03
        assert stats.busy_seconds <= elapsed + 1e-3


@pytest.mark.parametrize("io", IO_MODES)
def test_simulated_bandwidth_is_shared_by_threads(file, io):
    path, _ = file
    gbps = 1e-3
    with Storage(path, io=io, gbps=gbps) as s:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=s.read, args=(i * 10_000, 10_000)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        stats = s.stats
        assert elapsed >= stats.device_bytes / (gbps * 1e9) >= 0.03
        assert 0.03 <= stats.busy_seconds <= elapsed + 1e-3  # the union of the in-flight intervals, not their sum


@pytest.mark.parametrize("gbps", [0, -1, 1e-4, float("nan"), float("inf"), "fast"])
def test_bad_bandwidth(file, gbps):
    with pytest.raises(StorageValueError, match="--storage must be") as info:
        Storage(file[0], gbps=gbps)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ZipmoeError)
    assert "\n" not in str(info.value)


def test_bad_mode(file):
    with pytest.raises(StorageValueError, match="mmap.*buffered, direct"):
        Storage(file[0], io="mmap")


def test_missing_file(tmp_path):
    for io in IO_MODES:
        with pytest.raises(StorageError, match="missing.bin") as info:
            Storage(tmp_path / "missing.bin", io=io)
        assert isinstance(info.value, OSError) and info.value.errno == errno.ENOENT


@pytest.mark.parametrize("io", IO_MODES)
def test_out_of_range_reads(file, io):
    path, data = file
    n = len(data)
    with Storage(path, io=io) as s:
        for offset, nbytes in [(n, 1), (n - 10, 11), (n + 100, 0), (0, n + 1)]:
            with pytest.raises(StorageValueError) as info:
                s.read(offset, nbytes)
            message = str(info.value)
            assert "\n" not in message and str(path) in message
            assert f"offset {offset}" in message and f"{nbytes} bytes" in message and f"{n} bytes" in message
        for offset, nbytes in [(-1, 10), (0, -1)]:
            with pytest.raises(StorageValueError, match="invalid"):
                s.read(offset, nbytes)
        with pytest.raises(StorageValueError, match=f"{n} bytes"):
            s.read_pieces(n - 10, [5, 6])  # checked when called, before iteration
        with pytest.raises(StorageValueError):
            s.read_pieces(0, [5, -1])
        assert s.stats.reads == 0


@pytest.mark.parametrize("io", IO_MODES)
def test_short_read_when_the_file_shrinks(file, io):
    path, data = file
    with Storage(path, io=io) as s:
        os.truncate(path, 5000)
        with pytest.raises(StorageError, match="short read at offset 8000") as info:
            s.read(8000, 100)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        assert s.read(4000, 500).tobytes() == data[4000:4500]  # what is left still reads
        assert s.read(4000, 1000).tobytes() == data[4000:5000]
        pieces = [p.tobytes() for p in s.read_pieces(0, [3000, 1999, 1])]
        assert pieces == [data[:3000], data[3000:4999], data[4999:5000]]
        with pytest.raises(StorageError, match="short read"):
            list(s.read_pieces(0, [3000, 1999, 2]))


@pytest.mark.parametrize("io", IO_MODES)
def test_bad_out_buffer(file, io):
    path, _ = file
    with Storage(path, io=io) as s:
        with pytest.raises(ValueError):
            s.read(0, 100, out=np.empty(10, np.uint8))
        with pytest.raises(TypeError):
            s.read(0, 100, out=np.empty(100, np.float32))
        if s.alignment > 1:
            buf = s.buffer(100)
            with pytest.raises(ValueError, match="aligned"):
                s.read(0, 100, out=buf[1:])


@pytest.mark.parametrize("io", IO_MODES)
def test_accounting(file, io):
    path, data = file
    with Storage(path, io=io) as s:
        start = s.snapshot()
        s.read(10, 100)
        s.read(len(data) - 7, 7)
        s.read(0, 0)  # no request
        end = s.snapshot()
        assert end.reads - start.reads == 2
        assert end.bytes_read - start.bytes_read == 107
        if s.alignment == 1:
            assert end.device_bytes == 107
        else:
            a = s.alignment
            assert end.device_bytes == a + (len(data) - (len(data) - 7) // a * a)
        with pytest.raises(AttributeError):
            end.reads = 0  # snapshots are immutable
        assert 0.0 < end.busy_seconds - start.busy_seconds <= end.at - start.at
        fraction = Storage.busy_fraction(start, end)
        assert 0.0 < fraction <= 1.0
        assert Storage.busy_fraction(start, end, wall_seconds=1e9) < fraction
        assert Storage.busy_fraction(end, end) == 0.0


def test_busy_fraction_with_a_slow_device(file):
    path, _ = file
    with Storage(path, gbps=1e-3) as s:
        start = s.snapshot()
        s.read(0, 20_000)
        time.sleep(0.02)  # idle
        end = s.snapshot()
    fraction = Storage.busy_fraction(start, end)
    assert 0.1 < fraction < 0.6  # about 20 ms busy out of at least 40


@pytest.mark.parametrize("io", IO_MODES)
def test_accounting_is_thread_safe(file, io):
    path, data = file
    per_thread, n_threads = 40, 4
    errors = []
    with Storage(path, io=io) as s:
        expected = 0
        plans = []
        for t in range(n_threads):
            plan = ranges(len(data), n=per_thread // 2, seed=10 + t)[8 : 8 + per_thread]
            plan = [(o, n) for o, n in plan if n]
            plans.append(plan)
            expected += sum(n for _, n in plan)

        def work(plan):
            try:
                for offset, n in plan:
                    assert s.read(offset, n).tobytes() == data[offset : offset + n]
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=work, args=(plan,)) for plan in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        assert not errors, errors[0]
        stats = s.stats
        assert stats.reads == sum(len(p) for p in plans)
        assert stats.bytes_read == expected
        assert stats.device_bytes >= expected
        assert 0.0 < stats.busy_seconds <= elapsed


def test_close(file):
    path, _ = file
    s = Storage(path, io="direct")
    s.close()
    s.close()
    with pytest.raises(StorageError, match="close"):
        s.read(0, 10)
    with Storage(path) as s:
        pass
    with pytest.raises(StorageError):
        s.read(0, 10)


def test_pinned_buffers(file):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA")
    path, data = file
    for io in IO_MODES:
        with Storage(path, io=io, pinned=True) as s:
            buf = s.buffer(10_000)
            assert s.read(123, 10_000, out=buf).tobytes() == data[123:10_123]
            assert torch.from_numpy(buf).is_pinned()


def test_module_loads_without_torch():
    code = "import sys, zipmoe.runtime.storage; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pinned_buffers_come_from_torch(file, monkeypatch):
    torch = pytest.importorskip("torch")
    calls = []
    real_empty = torch.empty

    def fake_empty(*args, pin_memory=False, **kwargs):  # pinning needs CUDA: record the request, allocate plainly
        calls.append(pin_memory)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", fake_empty)
    path, data = file
    for io in IO_MODES:
        with Storage(path, io=io, pinned=True) as s:
            buf = s.buffer(10_000)
            assert s.read(123, 10_000, out=buf).tobytes() == data[123:10_123]
            assert [p.tobytes() for p in s.read_pieces(5, [7, 9000])] == [data[5:12], data[12:9012]]
    assert calls and all(calls)
