"""`zipmoe bench codecs`: size and speed of the exponent coders against the entropy bound, zstd and zipnn.

Everything runs on the same tensors in one process: the routed-expert BF16 tensors of a checkpoint (all BF16
tensors if it has no recognised experts), up to a byte budget. Speeds are GB/s of BF16 (source) bytes, best of
``repeat`` rounds, for one thread and for all threads, each run handling all the tensors as one batch (as a
runtime loads several experts); decoding writes into preallocated buffers and, for zipmoe, checks every chunk
checksum unless the row says otherwise. zipnn gets each tensor in turn with its own thread count.
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
from zipmoe.codecs.parts import (
    DEFAULT_CHUNK_VALUES,
    Bf16Split,
    Fp8Split,
    PartView,
    decode_part,
    decode_parts,
    encode_parts,
)
from zipmoe.defaults import BENCH_CHUNK_VALUES as DEFAULT_CHUNKS
from zipmoe.defaults import BENCH_CODERS as DEFAULT_CODERS
from zipmoe.errors import CheckpointError, ZipmoeError
from zipmoe.formats.checkpoint import Checkpoint
from zipmoe.formats.experts import classify
from zipmoe.pack import check_chunk_values


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
    label: str = ""  # a short name for tables (default: ``method``); the note explains it below the table

    @property
    def name(self) -> str:
        return self.label or self.method

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
    cast_bf16: bool
    n_tensors: int
    source_bytes: int
    exponent_entropy: float
    threads: list[int]
    rows: list[Row]

    @property
    def entropy_bound(self) -> float:
        return (8 + self.exponent_entropy) / 16

    def row(self, method: str, chunk_values: int | None = None) -> Row | None:
        return next(
            (r for r in self.rows if r.method == method and (chunk_values is None or r.chunk_values == chunk_values)),
            None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "cast_bf16": self.cast_bf16,
            "n_tensors": self.n_tensors,
            "source_bytes": self.source_bytes,
            "exponent_entropy_bits": self.exponent_entropy,
            "entropy_bound": self.entropy_bound,
            "threads": self.threads,
            "rows": [r.to_json() for r in self.rows],
        }


def _to_bf16(data: np.ndarray, dtype: str) -> np.ndarray:
    """Round F32/F16 little-endian bytes to BF16 (nearest, ties to even) as a BF16 release of the model would."""
    f32 = data.view("<f4") if dtype == "F32" else data.view("<f2").astype(np.float32)
    bits = f32.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").view(np.uint8)


def load_tensors(checkpoint: Checkpoint, max_bytes: int, *, cast_bf16: bool = False) -> list[tuple[str, np.ndarray]]:
    """The BF16 expert tensors of a checkpoint (or all its BF16 tensors), in checkpoint order, up to ``max_bytes``.

    With ``cast_bf16``, F32 and F16 weight matrices (2-D or more) are rounded to BF16 and measured instead, so a
    trained model published in another dtype can serve as real-weights data.
    """
    layout = classify(checkpoint.config, [t for _, t in checkpoint.tensors.values()])
    ordered = sorted(checkpoint.tensors.values(), key=lambda ft: (ft[0], ft[1].start))
    wanted = ("F32", "F16") if cast_bf16 else ("BF16",)
    candidates = [
        (i, t) for i, t in ordered if t.dtype in wanted and t.nbytes > 0 and (not cast_bf16 or len(t.shape) >= 2)
    ]
    chosen = [(i, t) for i, t in candidates if t.name in layout.experts] or candidates
    out = []
    total = 0
    for file_index, t in chosen:
        size = t.nbytes if t.dtype == "BF16" else t.nbytes * 2 // (4 if t.dtype == "F32" else 2)
        if out and total + size > max_bytes:
            break
        data = np.empty(t.nbytes, np.uint8)
        checkpoint.files[file_index].read_into(t.start, data)
        out.append((t.name, data if t.dtype == "BF16" else _to_bf16(data, t.dtype)))
        total += size
    return out


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class _Method:
    """One way to store the tensors: its row, and callables that encode or decode everything with n threads."""

    row: Row
    encode: Callable[[int], Any] | None  # None: not timed (same encoder as another row)
    decode: Callable[[int], Any]
    threads: tuple[int, ...]  # thread counts it can use


def _zipmoe_method(
    tensors: list[tuple[str, np.ndarray]],
    coder: ExponentCoder,
    chunk_values: int,
    pools: dict[int, Workers],
    *,
    check: bool = True,
    encode: bool = True,
    split: type[Bf16Split] | type[Fp8Split] = Bf16Split,
) -> _Method:
    encoding = split(coder, chunk_values)
    datas = [d for _, d in tensors]
    parts = encode_parts(encoding, datas, pools[1])
    views = [
        PartView(encoding, 0, p.data.size, d.size, p.n_chunks, p.directory_xxh64, 0)
        for p, (_, d) in zip(parts, tensors)
    ]
    outs = [np.empty(d.size, np.uint8) for _, d in tensors]
    for (name, d), v, p, o in zip(tensors, views, parts, outs):
        decode_part(p.data, v, o, pools[1])
        if not np.array_equal(o, d):  # pragma: no cover - a codec bug
            raise AssertionError(f"{coder.label}: {name} does not round-trip")
    source = sum(d.size for _, d in tensors)
    row = Row(coder.label, chunk_values, sum(p.data.size for p in parts), source)

    # Everything at once, as a runtime loads a batch of experts: chunks of all tensors spread over the threads.
    items = [(p.data, v, o, name) for p, v, o, (name, _) in zip(parts, views, outs, tensors)]

    def decode_all(n: int) -> None:
        decode_parts(items, pools[n], check=check)

    def encode_all(n: int) -> None:
        encode_parts(encoding, datas, pools[n])

    return _Method(row, encode_all if encode else None, decode_all, tuple(pools))


def _zstd_raw_method(tensors: list[tuple[str, np.ndarray]], level: int, dtype: str = "BF16") -> _Method:
    compressor = zstandard.ZstdCompressor(level=level)
    decompressor = zstandard.ZstdDecompressor()
    frames = [compressor.compress(d) for _, d in tensors]
    for frame, (_, d) in zip(frames, tensors):
        if decompressor.decompress(frame) != d.tobytes():  # pragma: no cover - library bug
            raise AssertionError("zstd does not round-trip")
    source = sum(d.size for _, d in tensors)
    row = Row(
        f"zstd-{level} on raw {dtype} bytes", None, sum(len(f) for f in frames), source, label=f"zstd-{level}, raw"
    )
    return _Method(
        row,
        lambda n: [compressor.compress(d) for _, d in tensors],
        lambda n: [decompressor.decompress(f) for f in frames],
        (1,),
    )


def _zipnn_method(tensors: list[tuple[str, np.ndarray]], thread_counts: list[int]) -> _Method | Row:
    source = sum(d.size for _, d in tensors)
    try:
        from zipnn import ZipNN
    except ImportError:
        return Row("zipnn", None, source, source, note="not installed: pip install 'zipmoe[bench]'")
    codecs = {n: ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=n) for n in thread_counts}
    # zipnn rewrites its input buffer in place, so it always gets a copy; round trips are checked on the original.
    compressed = [codecs[1].compress(bytearray(d)) for _, d in tensors]
    for n, codec in codecs.items():
        for c, (name, d) in zip(compressed, tensors):
            if bytes(codec.decompress(c)) != d.tobytes():  # pragma: no cover - zipnn bug
                raise AssertionError(f"zipnn ({n} threads): {name} does not round-trip")
    row = Row("zipnn", None, sum(len(c) for c in compressed), source, note="byte mode, bfloat16")
    return _Method(
        row,
        lambda n: [codecs[n].compress(bytearray(d)) for _, d in tensors],
        lambda n: [codecs[n].decompress(c) for c in compressed],
        tuple(thread_counts),
    )


def time_methods(methods: list[_Method], thread_counts: list[int], repeat: int, note: Callable[[str], None]) -> None:
    """Time every method's decode (``repeat`` rounds) and encode (at most 2) with each thread count, keeping each
    one's best GB/s in its row.

    Timed in rounds over all methods: a noisy moment on a shared machine then slows one round of every method instead
    of all rounds of one.
    """
    for n in thread_counts:
        for phase, runs in (("decode", repeat), ("encode", min(repeat, 2))):
            note(f"timing {phase}, {n} thread(s), {runs} round(s)")
            for _ in range(runs):
                for m in methods:
                    run = getattr(m, phase)
                    if n not in m.threads or run is None:
                        continue
                    seconds = _seconds(lambda: run(n))
                    speeds = m.row.decode_gbps if phase == "decode" else m.row.encode_gbps
                    speeds[n] = max(speeds.get(n, 0.0), m.row.source_bytes / seconds / 1e9)


def run_codec_bench(
    checkpoint: Checkpoint,
    *,
    max_bytes: int = 256 << 20,
    coders: tuple[str, ...] = DEFAULT_CODERS,
    chunk_values: tuple[int, ...] = DEFAULT_CHUNKS,
    threads: int | None = None,
    repeat: int = 5,
    cast_bf16: bool = False,
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
        cast_bf16: measure F32/F16 weights rounded to BF16 (see `load_tensors`).
        on_row: called with a short description before each measurement (for progress display).

    Raises:
        PackOptionError: a chunk size that is not a valid ``--chunk-values``.
        CheckpointError: the checkpoint has no tensors to measure.
    """
    for cv in chunk_values:
        check_chunk_values(cv)
    tensors = load_tensors(checkpoint, max_bytes, cast_bf16=cast_bf16)
    if not tensors:
        hint = "" if cast_bf16 else " (add --cast-bf16 for a model stored in F32 or F16)"
        raise CheckpointError(f"{checkpoint.root}: no {'F32/F16' if cast_bf16 else 'BF16'} tensors to measure{hint}")
    histogram = np.zeros(256, np.int64)
    for _, d in tensors:
        exponent_histogram(d.view(np.uint16), histogram)
    all_threads = threads or available_cpus()
    thread_counts = sorted({1, all_threads})
    note = on_row or (lambda s: None)
    pools = {n: Workers(n) for n in thread_counts}
    methods: list[_Method] = []
    rows: list[Row] = []
    try:
        for spec in coders:
            coder = parse_coder(spec)
            if coder is None:
                raise ZipmoeError("bench codecs compares exponent coders; 'none' (no coding) is not one")
            for cv in chunk_values if coder.codec_id == "rans" else (DEFAULT_CHUNK_VALUES,):
                note(f"encoding with {coder.label}, {cv} values per chunk")
                methods.append(_zipmoe_method(tensors, coder, cv, pools))
            if coder.codec_id == "rans":
                unchecked = _zipmoe_method(tensors, coder, DEFAULT_CHUNK_VALUES, pools, check=False, encode=False)
                unchecked.row.note = "decode without checksum verification"
                unchecked.row.label = f"{coder.label}, no checksums"
                methods.append(unchecked)
        note("zstd-3 on raw BF16 bytes")
        methods.append(_zstd_raw_method(tensors, 3))
        note("zipnn")
        zipnn = _zipnn_method(tensors, thread_counts)
        if isinstance(zipnn, Row):
            rows.append(zipnn)
        else:
            methods.append(zipnn)
        time_methods(methods, thread_counts, repeat, note)
    finally:
        for pool in pools.values():
            pool.close()
    rows = [m.row for m in methods] + rows
    return CodecReport(
        checkpoint=checkpoint.source.describe(),
        cast_bf16=cast_bf16,
        n_tensors=len(tensors),
        source_bytes=sum(d.size for _, d in tensors),
        exponent_entropy=entropy_bits(histogram),
        threads=thread_counts,
        rows=rows,
    )
