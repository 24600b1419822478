"""FP8 codec benchmark: lossless storage of weights block-quantized to FP8 E4M3 as DeepSeek-V3's are.

    zipmoe bench codecs CHECKPOINT --fp8 [--max-mb N] [--coders rans,zstd:3] [--repeat N] [-t N] [--json]

The weights are a checkpoint's trained weight matrices (those `zipmoe bench codecs` measures: BF16 ones, or F32/F16
ones rounded to BF16 when it has none), each quantized with a float32 scale per 128x128 block
(`zipmoe.codecs.fp8_blocks.quantize_blocks`, ``weight_scale_inv = amax / 448``). Rows: the ``fp8-split`` encoding
with each coder (with and without checksum verification), zstd on the raw FP8 bytes, zipmoe's ``raw`` encoding (a
checksummed copy), the order-0 entropy bound of the 4-bit exponent field ``(4 + H) / 8``, and the size of the
rejected layout with one sign-mantissa byte per value. Ratios are of the FP8 bytes: the F32 scales (4 bytes per
16,384 weights) are stored raw either way and left out. Speeds are GB/s of FP8 bytes, timed as `zipmoe bench codecs`
times (`zipmoe.bench.codecs.time_methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from zipmoe._threads import Workers, available_cpus
from zipmoe.bench.codecs import Row, _Method, _zipmoe_method, _zstd_raw_method, load_tensors, time_methods
from zipmoe.codecs.bf16 import entropy_bits
from zipmoe.codecs.coders import parse_coder
from zipmoe.codecs.fp8 import exponent_histogram
from zipmoe.codecs.fp8_blocks import quantize_blocks
from zipmoe.codecs.parts import DEFAULT_CHUNK_VALUES, Fp8Split, PartView, Raw, decode_parts, encode_parts, pad8
from zipmoe.errors import CheckpointError, ZipmoeError
from zipmoe.formats.checkpoint import Checkpoint


@dataclass
class Fp8Report:
    """The result of one FP8 benchmark run."""

    checkpoint: str
    n_tensors: int
    source_bytes: int  # FP8 bytes measured
    scale_bytes: int  # their F32 block scales
    exponent_entropy: float  # bits per value, of the 4-bit exponent fields
    threads: list[int]
    rows: list[Row]

    @property
    def entropy_bound(self) -> float:
        return (4 + self.exponent_entropy) / 8

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "n_tensors": self.n_tensors,
            "source_bytes": self.source_bytes,
            "scale_bytes": self.scale_bytes,
            "exponent_entropy_bits": self.exponent_entropy,
            "entropy_bound": self.entropy_bound,
            "threads": self.threads,
            "rows": [r.to_json() for r in self.rows],
        }


def fp8_weights(checkpoint: Checkpoint, max_bytes: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, FP8 bytes, weight_scale_inv)`` of the checkpoint's weight matrices quantized as DeepSeek-V3's, up
    to ``max_bytes`` FP8 bytes; each matrix is viewed as ``[shape[0], prod(shape[1:])]``."""
    tensors = load_tensors(checkpoint, 2 * max_bytes) or load_tensors(checkpoint, 2 * max_bytes, cast_bf16=True)
    out = []
    for name, data in tensors:
        shape = checkpoint.tensors[name][1].shape
        if len(shape) < 2:
            continue
        weights = (data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape[0], -1)
        if not np.isfinite(weights).all():
            continue
        q, scale_inv = quantize_blocks(weights)
        out.append((name, q.reshape(-1), scale_inv))
    return out


def _raw_method(tensors: list[tuple[str, np.ndarray]], pools: dict[int, Workers]) -> _Method:
    encoding = Raw()
    parts = encode_parts(encoding, [d for _, d in tensors], pools[1])
    items = [
        (p.data, PartView(encoding, 0, p.data.size, d.size, p.n_chunks, p.directory_xxh64, 0), np.empty_like(d), name)
        for p, (name, d) in zip(parts, tensors)
    ]
    source = sum(d.size for _, d in tensors)
    row = Row("raw (zipmoe raw encoding: checksummed copy)", None, sum(p.data.size for p in parts), source, label="raw")
    return _Method(
        row,
        lambda n: encode_parts(encoding, [d for _, d in tensors], pools[n]),
        lambda n: decode_parts(items, pools[n]),
        tuple(pools),
    )


def run_fp8_bench(
    checkpoint: Checkpoint,
    *,
    max_bytes: int = 64 << 20,
    coders: tuple[str, ...] = ("rans", "zstd:3"),
    chunk_values: int = DEFAULT_CHUNK_VALUES,
    threads: int | None = None,
    repeat: int = 5,
    on_row: Callable[[str], None] | None = None,
) -> Fp8Report:
    """Measure fp8-split with each coder, zstd on the raw FP8 bytes and the raw encoding on block-quantized weights.

    Args:
        checkpoint: where the trained weights come from.
        max_bytes: at most this many FP8 bytes are measured.
        coders: exponent coder specs (``rans``, ``zstd:3``, ...).
        chunk_values: FP8 values per chunk.
        threads: the "all threads" count (default: every available CPU).
        repeat: timed repetitions; the best is kept.
        on_row: called with a short description before each measurement.

    Raises:
        CheckpointError: the checkpoint has no weight matrices to quantize.
    """
    weights = fp8_weights(checkpoint, max_bytes)
    if not weights:
        raise CheckpointError(f"{checkpoint.root}: no finite BF16, F32 or F16 weight matrices to quantize to FP8")
    tensors = [(name, q) for name, q, _ in weights]
    histogram = np.zeros(16, np.int64)
    for _, q in tensors:
        exponent_histogram(q, histogram)
    note = on_row or (lambda s: None)
    thread_counts = sorted({1, threads or available_cpus()})
    pools = {n: Workers(n) for n in thread_counts}
    methods: list[_Method] = []
    try:
        for spec in coders:
            coder = parse_coder(spec)
            if coder is None:
                raise ZipmoeError("the FP8 benchmark compares exponent coders; 'none' (no coding) is not one")
            note(f"encoding with fp8-split/{coder.label}")
            method = _zipmoe_method(tensors, coder, chunk_values, pools, split=Fp8Split)
            method.row.method = method.row.label = f"fp8-split/{coder.label}"
            methods.append(method)
            if coder.codec_id == "rans":
                unchecked = _zipmoe_method(
                    tensors, coder, chunk_values, pools, check=False, encode=False, split=Fp8Split
                )
                unchecked.row.method = f"fp8-split/{coder.label}, no checksum verification"
                unchecked.row.label = f"fp8-split/{coder.label}, no checksums"
                methods.append(unchecked)
        note("zstd-3 on raw FP8 bytes")
        methods.append(_zstd_raw_method(tensors, 3, "FP8"))
        note("raw encoding")
        methods.append(_raw_method(tensors, pools))
        time_methods(methods, thread_counts, repeat, note)
    finally:
        for pool in pools.values():
            pool.close()
    source = sum(q.size for _, q in tensors)
    rows = [m.row for m in methods]
    rans_row = next((r for r in rows if r.method == "fp8-split/rans"), None)
    if rans_row is not None:  # the same payloads, with a whole byte per sign-mantissa nibble
        extra = sum(pad8(q.size) - pad8((q.size + 1) // 2) for _, q in tensors)
        rows.append(
            Row(
                "fp8-split/rans layout with one sign-mantissa byte per value (rejected)",
                chunk_values,
                rans_row.stored_bytes + extra,
                source,
                label="a byte per sign-mantissa",
            )
        )
    return Fp8Report(
        checkpoint=checkpoint.source.describe(),
        n_tensors=len(tensors),
        source_bytes=source,
        scale_bytes=sum(s.nbytes for _, _, s in weights),
        exponent_entropy=entropy_bits(histogram),
        threads=thread_counts,
        rows=rows,
    )


def render(report: Fp8Report) -> str:
    """A markdown table of the report."""
    t = report.threads
    lines = [
        f"{report.n_tensors} tensors, {report.source_bytes / 1e6:.1f} MB of FP8 E4M3 (+{report.scale_bytes} bytes of "
        f"F32 block scales), exponent entropy {report.exponent_entropy:.3f} bits of 4",
        "",
        "| method | ratio | " + " | ".join(f"enc {n}T" for n in t) + " | " + " | ".join(f"dec {n}T" for n in t) + " |",
        "|---|---|" + "---|" * (2 * len(t)),
        f"| order-0 entropy bound (4+H)/8 | {report.entropy_bound:.2%} |" + " |" * (2 * len(t)),
    ]
    for r in report.rows:
        enc = " | ".join(f"{r.encode_gbps[n]:.2f}" if n in r.encode_gbps else "" for n in t)
        dec = " | ".join(f"{r.decode_gbps[n]:.2f}" if n in r.decode_gbps else "" for n in t)
        lines.append(f"| {r.name} | {r.ratio:.2%} | {enc} | {dec} |")
    lines.append("")
    lines.append("GB/s of FP8 bytes; zipmoe rows decode with checksum verification unless they say otherwise.")
    return "\n".join(lines)
