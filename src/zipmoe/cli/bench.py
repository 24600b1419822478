"""``zipmoe bench codecs`` and ``zipmoe bench pack``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from zipmoe.cli._options import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    ThreadsOpt,
    ZipmoeGroup,
    choice,
    concrete_device,
    eval_tokens,
    storage,
)
from zipmoe.cli._options import max_new_tokens as max_new_tokens_option
from zipmoe.cli._options import memory_budget as memory_budget_option
from zipmoe.cli._output import human_bytes, percent, prepare_codecs, print_json, stderr, stdout, styled, table, warn
from zipmoe.defaults import BENCH_CHUNK_VALUES, BENCH_CODERS
from zipmoe.demo import cached_demo_checkpoint
from zipmoe.errors import ZipmoeError
from zipmoe.sizes import parse_percentages

app = typer.Typer(
    cls=ZipmoeGroup,
    help="Benchmarks that print ratios against baselines measured in the same run.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)

SERVING_PRESETS = {"qwen-moe-bench": "synthetic:qwen", "deepseek-v2-lite": "synthetic:deepseek"}  # and their routing

CheckpointArg = Annotated[
    Optional[str],
    typer.Argument(
        help="Checkpoint directory or Hub id (default: a built-in random-init checkpoint with Qwen1.5-MoE "
        "expert shapes, built offline on first use).",
        show_default=False,
    ),
]


def _resolve(checkpoint: str | None) -> str:
    return checkpoint if checkpoint is not None else str(cached_demo_checkpoint("bench"))


@app.command(
    "codecs",
    epilog="""Examples:

  zipmoe bench codecs                          # the built-in checkpoint, every coder, 1 and all threads

  zipmoe bench codecs ./Qwen1.5-MoE-A2.7B --max-mb 512 --coders rans,zstd:3 -t 8

  zipmoe bench codecs ./all-MiniLM-L6-v2 --cast-bf16 --json   # trained weights, stored in F32

  zipmoe bench codecs ./all-MiniLM-L6-v2 --fp8 --coders rans,zstd:3   # the same, block-quantized to FP8
""",
)
def codecs(
    checkpoint: CheckpointArg = None,
    max_mb: Annotated[int, typer.Option("--max-mb", min=1, help="Measure at most this many MB of BF16 tensors.")] = 256,
    coders: Annotated[str, typer.Option("--coders", help="Comma-separated coder specs.")] = ",".join(BENCH_CODERS),
    chunks: Annotated[
        str, typer.Option("--chunk-values", help="Comma-separated chunk sizes (values) swept with rans.")
    ] = ",".join(map(str, BENCH_CHUNK_VALUES)),
    threads: ThreadsOpt = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed rounds per measurement; the best is kept.")] = 5,
    cast_bf16: Annotated[
        bool,
        typer.Option(
            "--cast-bf16", help="Measure F32/F16 weight matrices rounded to BF16 (real models stored in F32)."
        ),
    ] = False,
    fp8: Annotated[
        bool,
        typer.Option(
            "--fp8",
            help="Measure the weight matrices block-quantized to FP8 E4M3 as DeepSeek-V3's are: fp8-split with "
            "each coder vs the 4-bit exponent's entropy bound, zstd and the raw encoding.",
        ),
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compression ratio and encode/decode GB/s of every exponent coder vs the entropy bound, zstd and zipnn
    (with --fp8: on FP8 weights)."""
    from zipmoe.formats.checkpoint import check_source, open_checkpoint

    source = _resolve(checkpoint)
    check_source(source)  # before numba loads: a mistyped path fails at once
    from zipmoe.bench.codecs import run_codec_bench

    prepare_codecs(quiet)
    try:
        chunk_values = tuple(int(c) for c in chunks.split(",") if c.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {chunks!r}", param_hint="--chunk-values"
        ) from None
    on_row = None if quiet else (lambda s: stderr.print(f"measuring {s}"))
    if fp8:
        from zipmoe.bench.fp8 import render, run_fp8_bench

        report = run_fp8_bench(
            open_checkpoint(source), max_bytes=max_mb * 1_000_000,
            coders=tuple(c.strip() for c in coders.split(",") if c.strip() and c.strip() != "none"),
            threads=threads, repeat=repeat, on_row=on_row,
        )  # fmt: skip
        if json_output:
            print_json(report.to_json())
        else:
            print(render(report))
        return
    report = run_codec_bench(
        open_checkpoint(source),
        max_bytes=max_mb * 1_000_000,
        coders=tuple(c.strip() for c in coders.split(",") if c.strip()),
        chunk_values=chunk_values,
        threads=threads,
        repeat=repeat,
        cast_bf16=cast_bf16,
        on_row=on_row,
    )
    if json_output:
        print_json(report.to_json())
        return
    t, notes = _codecs_table(report, repeat)
    stdout.print(t)
    stdout.print("\n".join(notes))


def _codecs_table(report, repeat: int):
    """bench codecs' table, and the notes that explain its short method names."""
    zipnn = report.row("zipnn")
    has_zipnn = zipnn is not None and not zipnn.note.startswith("not installed")
    # One thread, and all of them when that is more than one (-t 1 would repeat the columns).
    speeds = [(phase, n) for phase in ("enc", "dec") for n in report.threads]
    cast = " (cast from F32/F16)" if report.cast_bf16 else ""
    title = (
        f"Exponent coders on {report.checkpoint}: {report.n_tensors} tensors, "
        f"{human_bytes(report.source_bytes)} BF16{cast}, exponent entropy {report.exponent_entropy:.3f} bits"
    )
    t = table("method", "chunk", "ratio", "vs zipnn", *(f"{phase}\n{n}T" for phase, n in speeds), "dec 1T\nvs zipnn",
              title=title)  # fmt: skip
    bound = report.entropy_bound
    t.add_row("entropy bound", "-", percent(bound), _vs(bound, zipnn.ratio if has_zipnn else None), *["-"] * len(speeds),
              "-")  # fmt: skip
    for r in report.rows:
        t.add_row(
            r.name,
            _chunk(r.chunk_values),
            percent(r.ratio) if r.stored_bytes != r.source_bytes or r.method != "zipnn" else "-",
            _vs(r.ratio, zipnn.ratio if has_zipnn else None),
            *(_gbps((r.encode_gbps if phase == "enc" else r.decode_gbps).get(n)) for phase, n in speeds),
            _times(r.decode_gbps.get(1), zipnn.decode_gbps.get(1) if has_zipnn else None),
        )
    threads = " and ".join(map(str, report.threads))
    notes = [
        f"enc, dec: GB/s of BF16 with {threads} thread{'s' if report.threads[-1] > 1 else ''} (T), best of {repeat}; "
        "chunk: values per chunk",
        "entropy bound: the order-0 bound (8+H)/16",
        *(f"{r.name}: {r.note}" for r in report.rows if r.note),
    ]
    return t, notes


def _chunk(values: int | None) -> str:
    """A chunk size in values, short: 65536 -> 64Ki."""
    if values is None:
        return "-"
    for unit, size in (("Mi", 1 << 20), ("Ki", 1 << 10)):
        if values % size == 0:
            return f"{values // size}{unit}"
    return str(values)


@app.command(
    "pack",
    epilog="""Examples:

  zipmoe bench pack                            # the built-in checkpoint

  zipmoe bench pack ./Mixtral-8x7B-v0.1 -t 16 --repeat 3 --json
""",
)
def pack(
    checkpoint: CheckpointArg = None,
    threads: ThreadsOpt = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Pack runs; the best is kept.")] = 2,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pack throughput (verification included) and peak memory vs reading the files, in child processes."""
    from zipmoe.bench.pack import run_pack_bench
    from zipmoe.formats.checkpoint import open_checkpoint

    source = _resolve(checkpoint)
    report = run_pack_bench(open_checkpoint(source), source, threads=threads, repeat=repeat,
                            on_step=None if quiet else (lambda s: stderr.print(s)))  # fmt: skip
    if json_output:
        print_json(report.to_json())
        return
    stdout.print(_pack_table(report, repeat))


def _pack_table(report, repeat: int):
    """bench pack's measures, one a row."""
    t = table(
        "measure", "value", title=f"pack on {report.checkpoint}: {human_bytes(report.source_bytes)}, best of {repeat}"
    )
    t.add_row("read the safetensors files (baseline)", f"{report.read_mbps:.0f} MB/s")
    t.add_row(
        "pack, verification included (kernels loaded)",
        f"{report.pack_mbps:.0f} MB/s ({report.pack_mbps / report.read_mbps:.2f}x the read)",
    )
    t.add_row("zipmoe pack end to end (cold process)", f"{report.cold_mbps:.0f} MB/s ({report.cold_seconds:.2f} s)")
    t.add_row("container / source", percent(report.container_bytes / report.source_bytes))
    t.add_row("largest tensor", human_bytes(report.largest_tensor_bytes))
    t.add_row(
        "pack memory (peak RSS - import baseline)", human_bytes(report.peak_rss_bytes - report.baseline_rss_bytes)
    )
    t.add_row("peak RSS", human_bytes(report.peak_rss_bytes))
    return t


@app.command(
    "startup",
    epilog="""Examples:

  zipmoe bench startup

  zipmoe bench startup --repeat 21 --json
""",
)
def startup(
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed runs per case; the median is kept.")] = 7,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Start-up time of zipmoe --help, COMMAND --help, a usage error and import zipmoe, against python -c pass."""
    from zipmoe.bench.startup import run_startup_bench

    rows = run_startup_bench(repeat, on_case=None if quiet else (lambda name: stderr.print(f"timing {name}")))
    baseline = rows[0].median
    if json_output:
        print_json([r.to_json(baseline) for r in rows])
        return
    t = table("case", "median", "fastest", "vs python", "loads torch/numba", title=f"Start-up, median of {repeat}")
    for r in rows:
        heavy = ", ".join(m for m in r.loaded if m in ("torch", "numba")) or "no"
        t.add_row(r.name, f"{r.median * 1000:.0f} ms", f"{min(r.seconds) * 1000:.0f} ms",
                  f"{r.median / baseline:.1f}x", heavy)  # fmt: skip
    stdout.print(t)


def _gbps(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _vs(ratio: float, zipnn_ratio: float | None) -> str:
    return "-" if zipnn_ratio is None else f"{100 * (ratio - zipnn_ratio):+.2f} pt"


def _times(value: float | None, baseline: float | None) -> str:
    return "-" if value is None or not baseline else f"{value / baseline:.2f}x"


@app.command(
    "run",
    epilog="""Examples:

  zipmoe bench run                             # budgets 25%, 50%, 100%; 1.25 GB/s simulated and direct reads

  zipmoe bench run -m 25%,50% --storage 3.5,1.25 --plan auto -n 64

  zipmoe bench run --preset deepseek-v2-lite --sweep 'decoded=1:lru;sm=1:lfu' --json > run.json
""",
)
def run(
    checkpoint: Annotated[
        Optional[str],
        typer.Argument(
            help="Checkpoint directory (default: a built-in random-init model with Qwen1.5-MoE-A2.7B expert "
            "dimensions, 2 layers, built and packed offline on first use).",
            show_default=False,
        ),
    ] = None,
    budgets: Annotated[
        str, memory_budget_option("Comma-separated budgets, % of the BF16 expert bytes.", percentages=True)
    ] = "25%,50%,100%",
    storages: Annotated[
        str,
        typer.Option(
            "--storage",
            metavar="GBPS|direct,...",
            help="Comma-separated storage: a simulated speed in GB/s (0: the page cache), or direct (no simulation, "
            "O_DIRECT reads from the disk, as zipmoe run --io direct).",
        ),
    ] = "1.25,direct",
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            **choice(SERVING_PRESETS),
            help="The built-in checkpoint when none is given: qwen-moe-bench (Qwen1.5-MoE-A2.7B, 2 layers) or "
            "deepseek-v2-lite (DeepSeek-V2-Lite with its latent attention, 2 MoE layers).",
        ),
    ] = "qwen-moe-bench",
    routing: Annotated[
        Optional[str],
        typer.Option(
            "--routing",
            help="Which experts each token uses: synthetic:qwen, synthetic:deepseek (calibrated to real routers; "
            "default: the preset's), a trace recorded with zipmoe run --record-routing, or router (the model's own).",
        ),
    ] = None,
    sweep: Annotated[
        Optional[str],
        typer.Option(
            "--sweep",
            help="Extra zipmoe configurations, TIERS:POLICY separated by semicolons (e.g. 'decoded=1:lru;sm=1:lfu').",
        ),
    ] = None,
    plan: Annotated[
        Optional[str],
        typer.Option(
            "--plan",
            **choice(("auto",)),
            help="auto: add zipmoe-planned rows (a plan fitted on the trace's first half).",
        ),
    ] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length (the prefill).")] = 32,
    new_tokens: Annotated[int, max_new_tokens_option("Tokens generated per configuration.", min=2)] = 32,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """TTFT and TPOT under memory budgets and storage speeds: zipmoe vs the best uncompressed configuration of the
    same runtime, the full model in memory, and transformers + accelerate disk offload."""
    from zipmoe.extras import RUNTIME, require

    require("zipmoe bench run", *RUNTIME, "transformers", "accelerate")
    from zipmoe._threads import available_cpus
    from zipmoe.bench.serving import run_serving_bench

    storage_list = _storages(storages)
    budget_list = parse_percentages(budgets)
    device = concrete_device(device)
    source = Path(checkpoint if checkpoint is not None else cached_demo_checkpoint(preset))
    routing = routing or SERVING_PRESETS[preset]
    containers = _serving_containers(source, quiet)
    sweep_list = []
    for item in filter(None, (sweep or "").split(";")):
        tiers, _, policy = item.rpartition(":")
        if not tiers:
            raise ZipmoeError(f"--sweep: expected TIERS:POLICY, got {item!r}")
        sweep_list.append((tiers, policy))
    rows = run_serving_bench(
        source, containers["zipmoe"], containers["uncompressed"], budgets=budget_list, storages=storage_list,
        routing=routing, sweep=tuple(sweep_list), plan=plan == "auto", prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        threads=threads or available_cpus(), device=device,
        on_row=None if quiet else (lambda s: stderr.print(f"running {s}")),
    )  # fmt: skip
    if json_output:
        print_json([r.to_json() for r in rows])
        return
    for t in _serving_tables(rows, f"zipmoe run on {source}, routing {routing}"):
        stdout.print(t)
    mismatched = [f"#{i} {r.method}" for i, r in enumerate(rows, 1) if "tokens_match_full" in r.result
                  and not r.result["tokens_match_full"]]  # fmt: skip
    if mismatched:
        stdout.print(styled("NOT the full model's tokens:", "red", " " + ", ".join(mismatched)))
    else:
        stdout.print("every configuration generated the full model's tokens")
    warnings = {res["storage_warning"] for res in (r.result for r in rows) if res.get("storage_warning")}
    for warning in sorted(warnings):
        warn(warning)


@app.command(
    "cache",
    epilog="""Examples:

  zipmoe bench cache --plot cache.png

  zipmoe bench cache ./checkpoint -m 10%,30% --storage 3.5 --routing trace.jsonl --json
""",
)
def cache(
    checkpoint: Annotated[
        Optional[str],
        typer.Argument(help="Checkpoint directory (default: the --preset's built-in one).", show_default=False),
    ] = None,
    preset: Annotated[
        str, typer.Option("--preset", **choice(SERVING_PRESETS), help="The built-in checkpoint when none is given.")
    ] = "qwen-moe-bench",
    budgets: Annotated[
        str, memory_budget_option("Comma-separated budgets, % of the BF16 expert bytes.", percentages=True)
    ] = "10%,20%,30%,40%,50%",
    storage_gbps: Annotated[float, storage()] = 1.25,
    routing: Annotated[
        Optional[str], typer.Option("--routing", help="A trace, or synthetic:qwen / synthetic:deepseek.")
    ] = None,
    new_tokens: Annotated[int, max_new_tokens_option("Tokens generated per method.", min=2)] = 16,
    plot_path: Annotated[
        Optional[Path], typer.Option("--plot", help="Write hit rate and TPOT vs budget (PNG).")
    ] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """FIFO, LRU, LFU, planned and planned + cache-affinity scheduling on one routing trace: hit rates, bytes read
    and TPOT at several budgets, in one process."""
    from zipmoe.extras import RUNTIME, require

    require("zipmoe bench cache", *RUNTIME, *(("matplotlib",) if plot_path is not None else ()))
    from zipmoe._threads import available_cpus
    from zipmoe.bench.cache import plot, run_cache_bench

    budget_list = parse_percentages(budgets)
    device = concrete_device(device)
    source = Path(checkpoint if checkpoint is not None else cached_demo_checkpoint(preset))
    routing = routing or SERVING_PRESETS[preset]
    prepare_codecs(quiet)
    rows = run_cache_bench(
        _serving_containers(source, quiet)["zipmoe"], budgets=budget_list, storage_gbps=storage_gbps or None,
        routing=routing,
        new_tokens=new_tokens, threads=threads or available_cpus(), device=device,
        on_row=None if quiet or json_output else (lambda s: stderr.print(f"running {s}")),
    )  # fmt: skip
    title = f"zipmoe bench cache: {source.name}, routing {routing}, " + (
        f"{storage_gbps:g} GB/s" if storage_gbps else "page cache"
    )
    if plot_path is not None:
        plot(rows, plot_path, title)
    if json_output:
        print_json([r.to_json() for r in rows])
        return
    stdout.print(_cache_table(rows, title))


def _where(storage: float | str | None) -> str:
    return "page cache" if storage is None else storage if isinstance(storage, str) else f"{storage:g} GB/s"


def _serving_tables(rows, title: str) -> list:
    """bench run's rows as two tables that fit 100 columns: speeds, then memory and reads, numbered alike."""
    baseline = {(r.budget_percent, r.storage): r.result for r in rows if r.method == "uncompressed"}
    speed = table("#", "method", "budget", "storage", "TTFT", "TPOT", "TPOT\nvs unc.", "TTFT\nvs unc.", title=title)
    memory = table("#", "method", "served\ndec/comp/sm/st", "read", "storage\nbusy", "peak\n(of budget)",
                   "RSS\ngrowth", title="memory and reads of the same rows")  # fmt: skip
    for t in (speed, memory):
        t.columns[1].justify = "left"  # the method, after the row number
    for i, r in enumerate(rows, 1):
        res = r.result
        name = r.method if not r.config or r.config in r.method else f"{r.method}\n{r.config}"
        budget = "-" if r.budget_percent is None else f"{r.budget_percent:g}%"
        if "error" in res:
            speed.add_row(str(i), name, budget, _where(r.storage), res["error"], *["-"] * 3)
            memory.add_row(str(i), r.method, *["-"] * 5)
            continue
        base = baseline.get((r.budget_percent, r.storage))
        versus = base is not None and not r.method.startswith("uncompressed") and "router" not in r.method
        speed.add_row(
            str(i),
            name,
            budget,
            _where(r.storage),
            f"{res['ttft_seconds'] * 1000:.0f} ms",
            f"{res['tpot_seconds'] * 1000:.1f} ms",
            f"{res['tpot_seconds'] / base['tpot_seconds']:.2f}x" if versus else "-",
            f"{res['ttft_seconds'] / base['ttft_seconds']:.2f}x" if versus else "-",
        )
        cache = res.get("cache")
        served = "-" if not cache else "/".join(
            str(cache["served_from"].get(k, 0)) for k in ("decoded", "compressed", "sm", "storage")
        )  # fmt: skip
        busy = None if not cache else cache.get("storage_busy")
        memory.add_row(
            str(i),
            r.method,
            served,
            "-" if not cache else human_bytes(cache["bytes_read"]),
            "-" if busy is None else percent(busy),
            "-" if not cache else _of(cache["peak_bytes"], res["budget_bytes"]),
            human_bytes(res["peak_rss"] - res["rss_after_load"]),
        )
    return [speed, memory]


def _of(peak: int, budget: int) -> str:
    """``12.0 GB (86%)``: the peak, and how much of the budget it is."""
    return f"{human_bytes(peak)} ({peak / budget:.0%})" if budget else human_bytes(peak)


def _cache_table(rows, title: str):
    """bench cache's rows (TTFT and the rest are in --json): shares of expert uses served from each place."""
    t = table("method", "budget", "served\ndecoded", "served\nsm", "from\nstorage", "read", "TPOT", "predicted\nTPOT",
              title=title)  # fmt: skip
    for r in rows:
        res = r.result
        rate = res["served_rate"]
        predicted = res["predicted_tpot_seconds"]
        t.add_row(r.method, f"{r.budget_percent:g}%", percent(rate["decoded"]), percent(rate["sm"] + rate["compressed"]),
                  percent(rate["storage"]), human_bytes(res["bytes_read"]), f"{res['tpot_seconds'] * 1000:.1f} ms",
                  "-" if predicted is None else f"{predicted * 1000:.1f} ms")  # fmt: skip
    return t


def _slices_table(report, name: str, first_tokens: int):
    """bench slices' rows, against q8."""
    s = report.settings
    q8 = report.row("q8")
    storage_label = "page cache" if s["storage_gbps"] is None else f"{s['storage_gbps']:g} GB/s"
    t = table("method", "perplexity", "vs q8", "decode\nread", "vs q8", "decode\nmiss rate",
              f"misses in\nfirst {first_tokens}", "TPOT", "vs q8", title=f"{name}: budget {s['budget']}, storage "
              f"{storage_label}, prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new, {s['device']}")  # fmt: skip
    for r in report.rows:
        first = r.first_decode_misses
        t.add_row(
            r.method,
            f"{r.perplexity:.3f}",
            _times(r.perplexity, q8.perplexity),
            human_bytes(r.decode_bytes_read),
            _times(r.decode_bytes_read, q8.decode_bytes_read),
            percent(r.decode_miss_rate),
            "-" if first is None else str(first),
            f"{r.tpot * 1000:.1f} ms",
            _times(r.tpot, q8.tpot),
        )
    return t


def _storages(text: str) -> tuple[float | str | None, ...]:
    """bench run's ``--storage``: GB/s (0: the page cache, None) or ``direct``, separated by commas."""
    out: list[float | str | None] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            gbps = None if item == "direct" else float(item)
        except ValueError:
            raise ZipmoeError(f"--storage {item}: expected a speed in GB/s, or direct") from None
        if gbps is not None and not (math.isfinite(gbps) and gbps >= 0):
            raise ZipmoeError(f"--storage {item}: expected a speed of at least 0 GB/s")
        out.append("direct" if gbps is None else gbps or None)
    if not out:
        raise ZipmoeError("--storage: expected speeds in GB/s or direct, separated by commas")
    return tuple(out)


def _serving_containers(source: Path, quiet: bool) -> dict[str, Path]:
    """The checkpoint packed losslessly and with ``--coder none``, once (repacked when this zipmoe writes a newer
    format)."""
    from zipmoe.codecs.coders import RansCoder
    from zipmoe.formats.reader import Container
    from zipmoe.pack import PackOptions
    from zipmoe.pack import pack as run_pack

    containers = {}
    for name, coder in (("zipmoe", RansCoder()), ("uncompressed", None)):
        path = source.parent / f"{source.name}.{name}.zmoe"
        try:
            with Container(path) as c:
                stale = coder is not None and not all(layout.split for layout in c.expert_layouts.values())
                # the checkpoint was rebuilt (its preset changed) since this container was packed
                stale = stale or c.manifest.config != json.loads((source / "config.json").read_text(encoding="utf-8"))
        except ZipmoeError:
            stale = True
        if stale:
            if not quiet:
                stderr.print(f"packing {source} into {path}")
            run_pack(str(source), path, PackOptions(coder=coder, force=True))
        containers[name] = path
    return containers


@app.command(
    "serve",
    epilog="""Examples:

  zipmoe bench serve                             # qwen-moe-bench, 50%, 1.25 GB/s and direct; 1/4/8/16 streams

  zipmoe bench serve --streams 1,8 --storage 1.25 -n 16 --json > serve.json

Each level runs on a fresh `zipmoe serve` (same cold start), warmed by one unmeasured round; the server replays the
preset's synthetic routing, a different request of the trace for each sequence.""",
)
def serve(
    checkpoint: Annotated[
        Optional[str],
        typer.Argument(help="Checkpoint directory (default: the --preset's built-in one).", show_default=False),
    ] = None,
    preset: Annotated[
        str, typer.Option("--preset", **choice(SERVING_PRESETS), help="The built-in checkpoint when none is given.")
    ] = "qwen-moe-bench",
    budget: Annotated[str, memory_budget_option("Expert memory of the server, as zipmoe serve -m.")] = "50%",
    storages: Annotated[
        str,
        typer.Option(
            "--storage",
            metavar="GBPS|direct,...",
            help="Comma-separated storage: a simulated speed in GB/s, or direct (O_DIRECT reads, --io direct).",
        ),
    ] = "1.25,direct",
    streams: Annotated[
        str, typer.Option("--streams", metavar="N,...", help="Comma-separated numbers of concurrent streams.")
    ] = "1,4,8,16",
    requests: Annotated[
        int, typer.Option("--requests", min=1, max=1000, help="Measured requests per stream, one after another.")
    ] = 2,
    routing: Annotated[
        Optional[str], typer.Option("--routing", help="The server's routing (default: the preset's synthetic one).")
    ] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length of each request.")] = 32,
    new_tokens: Annotated[int, max_new_tokens_option("Tokens generated per request.", min=2)] = 32,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Aggregate tokens/s, TTFT and TPOT (p50/p95), cache hits and bytes read per token of zipmoe serve at several
    numbers of concurrent streams, with the openai client."""
    from zipmoe.extras import RUNTIME, SERVE, require

    require("zipmoe bench serve", *RUNTIME, *SERVE, "openai", "httpx")
    from zipmoe.bench.serve_load import run_serve_bench

    try:
        levels = sorted({int(n) for n in streams.split(",")})
    except ValueError:
        raise ZipmoeError(f"--streams: expected comma-separated integers, got {streams!r}") from None
    if not levels or levels[0] < 1 or levels[-1] > 256:
        raise ZipmoeError(f"--streams: each number must be in 1..256, got {streams!r}")
    source = Path(checkpoint if checkpoint is not None else cached_demo_checkpoint(preset))
    routing = routing or SERVING_PRESETS[preset]
    container = str(_serving_containers(source, quiet)["zipmoe"])
    common = ["-m", budget, "--routing", routing, "--device", device, "-q",
              "--max-context", str(prompt_tokens + new_tokens + 8), "--max-queue", str(4 * levels[-1])]  # fmt: skip
    if threads:
        common += ["--threads", str(threads)]
    results = {}
    for kind in _storages(storages):
        where = _where(kind)
        args = [*common, *(["--io", "direct"] if kind == "direct" else ["--storage", f"{kind or 0:g}"])]
        results[where] = run_serve_bench(
            container, server_args=args, levels=levels, requests=requests, max_tokens=new_tokens,
            prompt_tokens=prompt_tokens,
            on_level=None if quiet else (lambda s, where=where: stderr.print(f"running {where}, {s}")),
        )  # fmt: skip
    if json_output:
        print_json({where: [r.to_json() for r in rows] for where, rows in results.items()})
        return
    stdout.print(_serve_table(results, f"zipmoe serve {source.name}, {budget}, routing {routing}"))


def _serve_table(results: dict, title: str):
    t = table("storage", "streams", "tokens/s", "vs 1\nstream", "TTFT\np50 / p95", "TPOT\np50 / p95",
              "read per\ntoken", "vs 1\nstream", "served\ndec/comp/sm/st", "mean\nbatch", "peak\nRSS",
              title=title)  # fmt: skip
    for where, rows in results.items():
        one = next((r for r in rows if r.streams == 1), None)
        for r in rows:
            j = r.to_json()
            served = "/".join(f"{r.served_from.get(k, 0):.0f}" for k in ("decoded", "compressed", "sm", "storage"))
            t.add_row(
                where,
                str(r.streams),
                f"{r.tokens_per_second:.1f}",
                f"{r.tokens_per_second / one.tokens_per_second:.2f}x" if one and one.tokens_per_second else "-",
                f"{j['ttft_p50'] * 1000:.0f} / {j['ttft_p95'] * 1000:.0f} ms",
                f"{j['tpot_p50'] * 1000:.0f} / {j['tpot_p95'] * 1000:.0f} ms",
                human_bytes(r.bytes_per_token),
                f"{r.bytes_per_token / one.bytes_per_token:.2f}x" if one and one.bytes_per_token else "-",
                served,
                f"{r.mean_batch:.1f}",
                human_bytes(r.peak_rss) if r.peak_rss else "-",
            )
    return t


@app.command(
    "slices",
    epilog="""Examples:

  zipmoe bench slices                          # the trained test checkpoint, packed with --slices 8:4 once

  zipmoe bench slices sliced.zmoe --text wiki.txt -m 25% --storage 0   # 0: the page cache
""",
)
def slices(
    checkpoint: Annotated[
        Optional[str],
        typer.Argument(
            help="Checkpoint directory or a container packed with --slices (default: the trained Qwen2-MoE test "
            "checkpoint of the source tree, packed with --slices 8:4 on first use).",
            show_default=False,
        ),
    ] = None,
    text: Annotated[
        Optional[Path],
        typer.Option("--text", help="Prompt and evaluation text (default: the checkpoint's heldout.txt)."),
    ] = None,
    budget: Annotated[
        str, memory_budget_option("Expert memory for every method: 2GiB, 500MB or a % of the BF16 expert bytes.")
    ] = "30%",
    storage_gbps: Annotated[float, storage()] = 1.25,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length (the prefill).")] = 256,
    new_tokens: Annotated[int, max_new_tokens_option("Tokens generated per method.", min=2)] = 32,
    scored_tokens: Annotated[int, eval_tokens("Tokens scored for perplexity.")] = 8192,
    critical_threshold: Annotated[
        Optional[float], typer.Option("--critical-threshold", min=0.0, max=1.0, help="dbsc's threshold.")
    ] = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Generations per method (median TPOT).")] = 3,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Write perplexity vs TPOT here (PNG).")] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Bytes read, misses, TPOT and perplexity of lossless, q8, q4, dbsc and dbsc+pcw at one memory budget."""
    from zipmoe.extras import RUNTIME, require

    require("zipmoe bench slices", *RUNTIME, *(("matplotlib",) if plot_path is not None else ()))
    from zipmoe.bench.slices import FIRST_DECODE_TOKENS, plot, run_slice_bench
    from zipmoe.demo import cached_container, trained_checkpoint
    from zipmoe.quant.spec import SliceSpec

    device = concrete_device(device)
    prepare_codecs(quiet)
    source = Path(checkpoint) if checkpoint else trained_checkpoint()
    if source.is_file():
        container = source
    else:
        if not quiet:
            stderr.print(f"packing {source} with --slices 8:4 (once)")
        container = cached_container(source, f"{source.name}-slices-8-4", slices=SliceSpec(8, 4))
    text_path = text or source / "heldout.txt"
    try:
        content = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ZipmoeError(f"{text_path}: cannot read it as UTF-8 text ({exc}); pass --text") from None
    report = run_slice_bench(
        container, content, budget=budget, storage_gbps=storage_gbps or None, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, eval_tokens=scored_tokens, threshold=critical_threshold, repeat=repeat,
        threads=threads, device=device, on_step=None if quiet or json_output else (lambda s: stderr.print(s)),
    )  # fmt: skip
    if plot_path is not None:
        plot(report, plot_path)
    if json_output:
        print_json(report.to_json())
        return
    stdout.print(_slices_table(report, container.name, FIRST_DECODE_TOKENS))
    for target, measured, met in report.targets():
        stdout.print(styled("met", "green") if met else styled("not met", "red"), f" {target}: {measured}", sep="")
    if plot_path is not None:
        stdout.print(f"plot: {plot_path}")
