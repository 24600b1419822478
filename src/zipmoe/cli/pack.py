"""``zipmoe pack``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zipmoe.cli._options import ForceOpt, JsonOpt, QuietOpt, SourceArg, ThreadsOpt
from zipmoe.cli._output import human_bytes, percent, prepare_codecs, print_json, progress_bar, stdout, table, warn
from zipmoe.defaults import DEFAULT_CHUNK_VALUES

NAME = "pack"
EPILOG = """Examples:

  zipmoe pack ./Mixtral-8x7B-v0.1 -o mixtral.zmoe

  zipmoe pack Qwen/Qwen1.5-MoE-A2.7B            # from the Hub (or its local cache with HF_HUB_OFFLINE=1)

  zipmoe pack org/model@v1.0 --coder zstd:3 --threads 8

  zipmoe pack ./Qwen1.5-MoE-A2.7B --slices 8:4     # also AMAT 8-bit experts as 4-bit MSB + 4-bit LSB slices
"""

_ROWS = (
    ("expert", "expert tensors"),
    ("dense", "dense tensors"),
    ("files", "files and headers"),
    ("msb", "MSB slices (vs BF16)"),
    ("lsb", "LSB slices (vs BF16)"),
)


def command(
    source: SourceArg,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Container to write (default: NAME.zmoe here).")
    ] = None,
    coder: Annotated[
        str,
        typer.Option(
            "--coder", help="Exponent coder: rans, zstd[:LEVEL], lz4 or lz4hc[:LEVEL]; none stores BF16 uncompressed."
        ),
    ] = "rans",
    chunk_values: Annotated[
        int, typer.Option("--chunk-values", help="BF16 values per independently decodable chunk (multiple of 64).")
    ] = DEFAULT_CHUNK_VALUES,
    slices: Annotated[
        Optional[str],
        typer.Option(
            "--slices",
            help="Also store AMAT slices of every expert: HIGH:LOW bits, 8:4 (default scheme), 6:3 or 4:2. "
            "`zipmoe run --mode dbsc|q8|q4` serves them.",
        ),
    ] = None,
    routing: Annotated[
        Optional[Path],
        typer.Option(
            "--routing",
            help="A routing trace (zipmoe run --record-routing) whose activation counts are stored for cache "
            "planning (zipmoe run --plan auto).",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip reading every checksum back before publishing the file.")
    ] = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pack a Hugging Face MoE checkpoint into one verified .zmoe container (bit-exact)."""
    from zipmoe.formats.checkpoint import check_source

    check_source(source)  # before numba loads: a mistyped path fails at once
    from zipmoe._memory import peak_rss_bytes
    from zipmoe.codecs.coders import parse_coder
    from zipmoe.pack import PackOptions
    from zipmoe.pack import pack as run_pack
    from zipmoe.quant.spec import parse_slices

    options = PackOptions(
        coder=parse_coder(coder),
        chunk_values=chunk_values,
        threads=threads,
        verify=not no_verify,
        force=force,
        slices=parse_slices(slices) if slices is not None else None,
        routing=_routing_stats(routing) if routing is not None else None,
    )
    prepare_codecs(quiet)
    with progress_bar(f"Packing {source}", quiet) as (start, advance):
        result = run_pack(source, output, options, progress_start=start, progress=advance, warn=None if quiet else warn)
    peak_rss = peak_rss_bytes()
    if json_output:
        print_json(
            {
                "path": str(result.path),
                "source": result.source,
                "family": result.family,
                "tensors": result.n_tensors,
                "expert_records": result.n_expert_records,
                "source_bytes": result.source_bytes,
                "container_bytes": result.container_bytes,
                "ratio": result.ratio,
                "seconds": result.seconds,
                "verified": result.verified,
                "peak_rss_bytes": peak_rss,
                "classes": result.stats,
                "warnings": list(result.warnings),
            }
        )
        return
    speed = result.source_bytes / result.seconds / 1e6 if result.seconds else 0.0
    checked = "verified" if result.verified else "not verified (--no-verify)"
    t = table(
        "",
        "tensors",
        "source",
        "stored",
        "ratio",
        title=f"{result.path}: {result.source} ({result.family or 'dense only'})",
    )
    for key, label in _ROWS:
        s = result.stats.get(key)
        if s and s["source_bytes"]:
            count = str(s["n_tensors"]) if key != "files" else ""
            t.add_row(
                label,
                count,
                human_bytes(s["source_bytes"]),
                human_bytes(s["stored_bytes"]),
                percent(s["stored_bytes"] / s["source_bytes"]),
            )
    t.add_row(
        "container",
        str(result.n_tensors),
        human_bytes(result.source_bytes),
        human_bytes(result.container_bytes),
        percent(result.ratio),
        style="bold",
    )
    stdout.print(t)
    stdout.print(f"{result.n_expert_records} expert records; {result.seconds:.1f} s ({speed:.0f} MB/s); {checked}")


def _routing_stats(path: Path):
    """The activation counts of a routing trace file, as the manifest stores them."""
    from zipmoe.formats.manifest import RoutingStats
    from zipmoe.runtime.routing import RoutingTrace

    trace = RoutingTrace.read(path)
    counts, tokens = trace.counts()
    return RoutingStats(trace.num_experts, trace.top_k, trace.num_layers, tokens, tuple(map(tuple, counts.tolist())))
