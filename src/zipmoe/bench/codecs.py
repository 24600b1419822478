"""`zipmoe bench codecs`: size and speed of the exponent coders against the entropy bound, zstd and zipnn.

Everything runs on the same tensors in one process: the routed-expert BF16 tensors of a checkpoint (all BF16
tensors if it has no recognised experts), up to a byte budget. Speeds are GB/s of BF16 (source) bytes, best of
``repeat`` runs, for one thread and for all threads; decoding writes into a preallocated buffer and, for zipmoe,
checks every chunk checksum unless the row says otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from zipmoe._threads import Workers, available_cpus
from zipmoe.codecs.bf16 import entropy_bits, exponent_histogram
from zipmoe.codecs.coders import ExponentCoder, parse_coder
from zipmoe.codecs.parts import DEFAULT_CHUNK_VALUES, Bf16Split, PartView, decode_part, encode_part
from zipmoe.errors import CheckpointError
from zipmoe.formats.checkpoint import Checkpoint
from zipmoe.formats.experts import classify

DEFAULT_CODERS = ("rans", "zstd:3", "lz4", "lz4hc:9")
DEFAULT_CHUNKS = (1 << 14, 1 << 16, 1 << 18, 1 << 20)


@dataclass
class Row:
    """One measured method."""

    method: str
    chunk_values: int | None
    stored_bytes: int
    source_bytes: int
    encode_gbps: dict[int, float] = field(default_factory=dict)  # threads -> GB/s
    decode_gbps: dict[int, float] = field(default_factory=dict)
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.source_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "chunk_values": self.chunk_values,
            "ratio": self.ratio,
            "stored_bytes": self.stored_bytes,
            "source_bytes": self.source_bytes,
            "encode_gbps": {str(k): v for k, v in self.encode_gbps.items()},
            "decode_gbps": {str(k): v for k, v in self.decode_gbps.items()},
            "note": self.note,
        }


@dataclass
class CodecReport:
    """The result of one benchmark run."""

    checkpoint: str
    n_tensors: int
    source_bytes: int
    exponent_entropy: float
    threads: list[int]
    rows: list[Row]

    @property
    def entropy_bound(self) -> float:
        return (8 + self.exponent_entropy) / 16

    def row(self, method: str, chunk_values: int | None = None) -> Row | None:
        return next((r for r in self.rows if r.method == method and (chunk_values is None or r.chunk_values == chunk_values)), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "n_tensors": self.n_tensors,
            "source_bytes": self.source_bytes,
            "exponent_entropy_bits": self.exponent_entropy,
            "entropy_bound": self.entropy_bound,
            "threads": self.threads,
            "rows": [r.to_json() for r in self.rows],
        }


def load_tensors(checkpoint: Checkpoint, max_bytes: int) -> list[tuple[str, np.ndarray]]:
    """The BF16 expert tensors of a checkpoint (or all its BF16 tensors), in checkpoint order, up to ``max_bytes``."""
    layout = classify(checkpoint.config, [t for _, t in checkpoint.tensors.values()])
    ordered = sorted(checkpoint.tensors.values(), key=lambda ft: (ft[0], ft[1].start))
    bf16 = [(i, t) for i, t in ordered if t.dtype == "BF16" and t.nbytes > 0]
    chosen = [(i, t) for i, t in bf16 if t.name in layout.experts] or bf16
    out = []
    total = 0
    for file_index, t in chosen:
        if out and total + t.nbytes > max_bytes:
            break
        data = np.empty(t.nbytes, np.uint8)
        checkpoint.files[file_index].read_into(t.start, data)
        out.append((t.name, data))
        total += t.nbytes
    return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _measure_zipmoe(
    tensors: list[tuple[str, np.ndarray]], coder: ExponentCoder, chunk_values: int, threads: list[int], repeat: int,
    *, decode_only_checked: bool = True, encode: bool = True,
) -> Row:
    encoding = Bf16Split(coder, chunk_values)
    source = sum(d.size for _, d in tensors)
    parts = [encode_part(encoding, d, Workers(1)) for _, d in tensors]
    outs = [np.empty(d.size, np.uint8) for _, d in tensors]
    views = [PartView(encoding, 0, p.data.size, d.size, p.n_chunks, p.directory_xxh64, 0) for p, (_, d) in zip(parts, tensors)]
    for (name, d), p, v, o in zip(tensors, parts, views, outs):
        decode_part(p.data, v, o, Workers(1))
        if not np.array_equal(o, d):
            raise AssertionError(f"{coder.label}: {name} does not round-trip")  # pragma: no cover - a codec bug
    row = Row(coder.label, chunk_values, sum(p.data.size for p in parts), source)
    for n in threads:
        with Workers(n) as workers:
            if encode:
                row.encode_gbps[n] = source / _best(lambda: [encode_part(encoding, d, workers) for _, d in tensors], repeat) / 1e9

            def decode() -> None:
                for p, v, o in zip(parts, views, outs):
                    decode_part(p.data, v, o, workers, check=decode_only_checked)

            row.decode_gbps[n] = source / _best(decode, repeat) / 1e9
    return row


def _measure_zstd_raw(tensors: list[tuple[str, np.ndarray]], level: int, repeat: int) -> Row:
    compressor = zstandard.ZstdCompressor(level=level)
    decompressor = zstandard.ZstdDecompressor()
    source = sum(d.size for _, d in tensors)
    frames, seconds = _timed(lambda: [compressor.compress(d) for _, d in tensors])
    row = Row(f"zstd-{level} on raw BF16 bytes", None, sum(len(f) for f in frames), source)
    row.encode_gbps[1] = source / seconds / 1e9
    for frame, (_, d) in zip(frames, tensors):
        if decompressor.decompress(frame) != d.tobytes():  # pragma: no cover - library bug
            raise AssertionError("zstd does not round-trip")
    row.decode_gbps[1] = source / _best(lambda: [decompressor.decompress(f) for f in frames], repeat) / 1e9
    return row


def _measure_zipnn(tensors: list[tuple[str, np.ndarray]], threads: list[int], repeat: int) -> Row:
    try:
        from zipnn import ZipNN
    except ImportError:
        source = sum(d.size for _, d in tensors)
        return Row("zipnn", None, source, source, note="not installed: pip install 'zipmoe[bench]'")
    source = sum(d.size for _, d in tensors)
    row: Row | None = None
    for n in threads:
        codec = ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=n)
        # zipnn rewrites its input buffer in place, so it gets a copy and round trips are checked on the original.
        compressed, seconds = _timed(lambda: [codec.compress(bytearray(d)) for _, d in tensors])
        if row is None:
            row = Row("zipnn", None, sum(len(c) for c in compressed), source, note="byte mode, bfloat16")
            for c, (name, d) in zip(compressed, tensors):
                if bytes(codec.decompress(c)) != d.tobytes():  # pragma: no cover - zipnn bug
                    raise AssertionError(f"zipnn: {name} does not round-trip")
        row.encode_gbps[n] = source / seconds / 1e9
        row.decode_gbps[n] = source / _best(lambda: [codec.decompress(c) for c in compressed], repeat) / 1e9
    assert row is not None
    return row


def run_codec_bench(
    checkpoint: Checkpoint,
    *,
    max_bytes: int = 256 << 20,
    coders: tuple[str, ...] = DEFAULT_CODERS,
    chunk_values: tuple[int, ...] = DEFAULT_CHUNKS,
    threads: int | None = None,
    repeat: int = 3,
    on_row: Callable[[str], None] | None = None,
) -> CodecReport:
    """Measure every coder (at the default chunk size) and rans at every chunk size, plus the baselines.

    Args:
        checkpoint: where the tensors come from.
        max_bytes: at most this many BF16 bytes are measured.
        coders: coder specs (``rans``, ``zstd:3``, ``lz4``, ``lz4hc:9``...).
        chunk_values: chunk sizes to sweep with rans.
        threads: the "all threads" count (default: every available CPU).
        repeat: timed repetitions; the best is kept.
        on_row: called with a short description before each measurement (for progress display).
    """
    tensors = load_tensors(checkpoint, max_bytes)
    if not tensors:
        raise CheckpointError(f"{checkpoint.root}: no BF16 tensors to measure")
    histogram = np.zeros(256, np.int64)
    for _, d in tensors:
        exponent_histogram(d.view(np.uint16), histogram)
    all_threads = threads or available_cpus()
    thread_counts = sorted({1, all_threads})
    note = on_row or (lambda s: None)
    rows = []
    for spec in coders:
        coder = parse_coder(spec)
        sizes = chunk_values if coder.codec_id == "rans" else (DEFAULT_CHUNK_VALUES,)
        for cv in sizes:
            note(f"{coder.label}, {cv} values per chunk")
            rows.append(_measure_zipmoe(tensors, coder, cv, thread_counts, repeat))
        if coder.codec_id == "rans":
            note("rans without checksum verification")
            row = _measure_zipmoe(tensors, coder, DEFAULT_CHUNK_VALUES, thread_counts, repeat, decode_only_checked=False, encode=False)
            row.method, row.note = "rans", "decode without checksum verification"
            rows.append(row)
    note("zstd-3 on raw BF16 bytes")
    rows.append(_measure_zstd_raw(tensors, 3, repeat))
    note("zipnn")
    rows.append(_measure_zipnn(tensors, thread_counts, repeat))
    return CodecReport(
        checkpoint=checkpoint.source.describe(),
        n_tensors=len(tensors),
        source_bytes=sum(d.size for _, d in tensors),
        exponent_entropy=entropy_bits(histogram),
        threads=thread_counts,
        rows=rows,
    )
