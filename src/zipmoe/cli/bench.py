"""``zipmoe bench codecs`` and ``zipmoe bench pack``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zipmoe.bench.codecs import DEFAULT_CHUNKS, DEFAULT_CODERS, run_codec_bench
from zipmoe.bench.pack import run_pack_bench
from zipmoe.cli._options import JsonOpt, QuietOpt, ThreadsOpt
from zipmoe.cli._output import human_bytes, percent, prepare_codecs, print_json, stderr, stdout, styled, table, warn
from zipmoe.demo import cached_demo_checkpoint
from zipmoe.errors import ZipmoeError
from zipmoe.formats.checkpoint import open_checkpoint

app = typer.Typer(
    help="Benchmarks that print ratios against baselines measured in the same run.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)

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


@app.command("codecs")
def codecs(
    checkpoint: CheckpointArg = None,
    max_mb: Annotated[int, typer.Option("--max-mb", min=1, help="Measure at most this many MB of BF16 tensors.")] = 256,
    coders: Annotated[str, typer.Option("--coders", help="Comma-separated coder specs.")] = ",".join(DEFAULT_CODERS),
    chunks: Annotated[
        str, typer.Option("--chunk-values", help="Comma-separated chunk sizes (values) swept with rans.")
    ] = ",".join(map(str, DEFAULT_CHUNKS)),
    threads: ThreadsOpt = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed rounds per measurement; the best is kept.")] = 5,
    cast_bf16: Annotated[
        bool,
        typer.Option(
            "--cast-bf16", help="Measure F32/F16 weight matrices rounded to BF16 (real models stored in F32)."
        ),
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compression ratio and encode/decode GB/s of every exponent coder vs the entropy bound, zstd and zipnn."""
    source = _resolve(checkpoint)
    prepare_codecs(quiet)
    try:
        chunk_values = tuple(int(c) for c in chunks.split(",") if c.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {chunks!r}", param_hint="--chunk-values"
        ) from None
    report = run_codec_bench(
        open_checkpoint(source),
        max_bytes=max_mb * 1_000_000,
        coders=tuple(c.strip() for c in coders.split(",") if c.strip()),
        chunk_values=chunk_values,
        threads=threads,
        repeat=repeat,
        cast_bf16=cast_bf16,
        on_row=None if quiet else (lambda s: stderr.print(f"measuring {s}")),
    )
    if json_output:
        print_json(report.to_json())
        return
    zipnn = report.row("zipnn")
    has_zipnn = zipnn is not None and not zipnn.note.startswith("not installed")
    n = report.threads[-1]
    cast = " (cast from F32/F16)" if report.cast_bf16 else ""
    title = (
        f"Exponent coders on {report.checkpoint}: {report.n_tensors} tensors, "
        f"{human_bytes(report.source_bytes)} BF16{cast}, exponent entropy {report.exponent_entropy:.3f} bits; "
        f"GB/s of BF16, best of {repeat}"
    )
    t = table(
        "method",
        "chunk",
        "ratio",
        "vs zipnn",
        "enc 1T",
        f"enc {n}T",
        "dec 1T",
        f"dec {n}T",
        "dec 1T vs zipnn",
        title=title,
    )
    t.add_row(
        "order-0 entropy bound (8+H)/16",
        "-",
        percent(report.entropy_bound),
        _vs(report.entropy_bound, zipnn.ratio if has_zipnn else None),
        *["-"] * 5,
    )
    for r in report.rows:
        name = r.method + (f" ({r.note})" if r.note else "")
        t.add_row(
            name,
            str(r.chunk_values or "-"),
            percent(r.ratio) if r.stored_bytes != r.source_bytes or r.method != "zipnn" else "-",
            _vs(r.ratio, zipnn.ratio if has_zipnn else None),
            _gbps(r.encode_gbps.get(1)),
            _gbps(r.encode_gbps.get(n)),
            _gbps(r.decode_gbps.get(1)),
            _gbps(r.decode_gbps.get(n)),
            _times(r.decode_gbps.get(1), zipnn.decode_gbps.get(1) if has_zipnn else None),
        )
    stdout.print(t)


@app.command("pack")
def pack(
    checkpoint: CheckpointArg = None,
    threads: ThreadsOpt = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Pack runs; the best is kept.")] = 2,
    json_output: JsonOpt = False,
) -> None:
    """Pack throughput (verification included) and peak memory vs reading the files, in child processes."""
    source = _resolve(checkpoint)
    report = run_pack_bench(open_checkpoint(source), source, threads=threads, repeat=repeat)
    if json_output:
        print_json(report.to_json())
        return
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
    stdout.print(t)


def _gbps(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _vs(ratio: float, zipnn_ratio: float | None) -> str:
    return "-" if zipnn_ratio is None else f"{100 * (ratio - zipnn_ratio):+.2f} pt"


def _times(value: float | None, baseline: float | None) -> str:
    return "-" if value is None or not baseline else f"{value / baseline:.2f}x"


@app.command("run")
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
        str, typer.Option("--budgets", help="Comma-separated budgets, % of BF16 expert bytes.")
    ] = "25,50,100",
    storages: Annotated[
        str,
        typer.Option(
            "--storage",
            help="Comma-separated storage: a simulated speed in GB/s, or direct (O_DIRECT reads from the disk).",
        ),
    ] = "1.25,direct",
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="The built-in checkpoint when none is given: qwen-moe-bench (Qwen1.5-MoE experts) or "
            "deepseek-v2-lite (DeepSeek-V2-Lite experts).",
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
        typer.Option("--plan", help="auto: add zipmoe-planned rows (a plan fitted on the trace's first half)."),
    ] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length (the prefill).")] = 32,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, help="Tokens generated per configuration.")] = 32,
    threads: ThreadsOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu (float32 compute) or cuda (bfloat16).")] = "cpu",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """TTFT and TPOT under memory budgets and storage speeds: zipmoe vs the best uncompressed configuration of the
    same runtime, the full model in memory, and transformers + accelerate disk offload."""
    from zipmoe._threads import available_cpus
    from zipmoe.bench.serving import DIRECT, run_serving_bench

    if preset not in SERVING_PRESETS:
        raise ZipmoeError(f"unknown --preset {preset!r} (choose {', '.join(SERVING_PRESETS)})")
    source = Path(checkpoint if checkpoint is not None else cached_demo_checkpoint(preset))
    routing = routing or SERVING_PRESETS[preset]
    containers = _serving_containers(source, quiet)
    try:
        storage_list = tuple(DIRECT if s.strip() == DIRECT else float(s) for s in storages.split(","))
        budget_list = tuple(float(b) for b in budgets.split(","))
    except ValueError:
        raise ZipmoeError("--budgets takes numbers, --storage numbers (GB/s) or direct, separated by commas") from None
    sweep_list = []
    for item in filter(None, (sweep or "").split(";")):
        tiers, _, policy = item.rpartition(":")
        if not tiers:
            raise ZipmoeError(f"--sweep: expected TIERS:POLICY, got {item!r}")
        sweep_list.append((tiers, policy))
    rows = run_serving_bench(
        source, containers["zipmoe"], containers["uncompressed"], budgets=budget_list, storages=storage_list,
        routing=routing, sweep=tuple(sweep_list), plan=_plan_flag(plan), prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        threads=threads or available_cpus(), device=device,
        on_row=None if quiet else (lambda s: stderr.print(f"running {s}")),
    )  # fmt: skip
    if json_output:
        print_json([r.to_json() for r in rows])
        return
    baseline = {(r.budget_percent, r.storage): r.result for r in rows if r.method == "uncompressed"}
    t = table("method", "config", "budget", "storage", "TTFT", "TPOT", "TPOT vs unc.", "TTFT vs unc.",
              "served dec/comp/sm/storage", "read", "storage busy", "peak / budget", "RSS growth", "same tokens",
              title=f"zipmoe run on {source}, routing {routing}")  # fmt: skip
    for r in rows:
        res = r.result
        if "error" in res:
            t.add_row(r.method, "-", "-", "-", res["error"], *["-"] * 9)
            continue
        base = baseline.get((r.budget_percent, r.storage))
        cache = res.get("cache")
        served = "-" if not cache else "/".join(
            str(cache["served_from"].get(k, 0)) for k in ("decoded", "compressed", "sm", "storage")
        )  # fmt: skip
        busy = None if not cache else cache.get("storage_busy")
        versus = base is not None and not r.method.startswith("uncompressed") and "router" not in r.method
        t.add_row(
            r.method,
            r.config or "-",
            "-" if r.budget_percent is None else f"{r.budget_percent:g}%",
            "page cache" if r.storage is None else r.storage if isinstance(r.storage, str) else f"{r.storage:g} GB/s",
            f"{res['ttft_seconds'] * 1000:.0f} ms",
            f"{res['tpot_seconds'] * 1000:.1f} ms",
            f"{res['tpot_seconds'] / base['tpot_seconds']:.2f}x" if versus else "-",
            f"{res['ttft_seconds'] / base['ttft_seconds']:.2f}x" if versus else "-",
            served,
            "-" if not cache else human_bytes(cache["bytes_read"]),
            "-" if busy is None else percent(busy),
            "-" if not cache else f"{human_bytes(cache['peak_bytes'])} / {human_bytes(res['budget_bytes'])}",
            human_bytes(res["peak_rss"] - res["rss_after_load"]),
            "yes" if res.get("tokens_match_full") else "NO",
        )
    stdout.print(t)
    warnings = {res["storage_warning"] for res in (r.result for r in rows) if res.get("storage_warning")}
    for warning in sorted(warnings):
        warn(warning)


@app.command("cache")
def cache(
    checkpoint: Annotated[
        Optional[str],
        typer.Argument(help="Checkpoint directory (default: the --preset's built-in one).", show_default=False),
    ] = None,
    preset: Annotated[
        str, typer.Option("--preset", help="qwen-moe-bench or deepseek-v2-lite, when no checkpoint is given.")
    ] = "qwen-moe-bench",
    budgets: Annotated[str, typer.Option("--budgets", help="Comma-separated budgets, % of BF16 expert bytes.")] = (
        "10,20,30,40,50"
    ),
    storage: Annotated[float, typer.Option("--storage", help="Simulated storage speed, GB/s.")] = 1.25,
    routing: Annotated[
        Optional[str], typer.Option("--routing", help="A trace, or synthetic:qwen / synthetic:deepseek.")
    ] = None,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, help="Tokens generated per method.")] = 16,
    plot_path: Annotated[
        Optional[Path], typer.Option("--plot", help="Write hit rate and TPOT vs budget (PNG).")
    ] = None,
    threads: ThreadsOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """FIFO, LRU, LFU, planned and planned + cache-affinity scheduling on one routing trace: hit rates, bytes read
    and TPOT at several budgets, in one process."""
    from zipmoe._threads import available_cpus
    from zipmoe.bench.cache import plot, run_cache_bench

    if preset not in SERVING_PRESETS:
        raise ZipmoeError(f"unknown --preset {preset!r} (choose {', '.join(SERVING_PRESETS)})")
    source = Path(checkpoint if checkpoint is not None else cached_demo_checkpoint(preset))
    routing = routing or SERVING_PRESETS[preset]
    try:
        budget_list = tuple(float(b) for b in budgets.split(","))
    except ValueError:
        raise ZipmoeError("--budgets takes numbers separated by commas") from None
    prepare_codecs(quiet or json_output)
    rows = run_cache_bench(
        _serving_containers(source, quiet)["zipmoe"], budgets=budget_list, storage_gbps=storage, routing=routing,
        new_tokens=new_tokens, threads=threads or available_cpus(), device=device,
        on_row=None if quiet or json_output else (lambda s: stderr.print(f"running {s}")),
    )  # fmt: skip
    title = f"zipmoe bench cache: {source.name}, routing {routing}, {storage:g} GB/s"
    if plot_path is not None:
        plot(rows, plot_path, title)
    if json_output:
        print_json([r.to_json() for r in rows])
        return
    t = table("method", "budget", "served decoded", "served sm", "from storage", "read", "TTFT", "TPOT",
              "predicted TPOT", title=title)  # fmt: skip
    for r in rows:
        res = r.result
        rate = res["served_rate"]
        predicted = res["predicted_tpot_seconds"]
        t.add_row(r.method, f"{r.budget_percent:g}%", percent(rate["decoded"]), percent(rate["sm"] + rate["compressed"]),
                  percent(rate["storage"]), human_bytes(res["bytes_read"]), f"{res['ttft_seconds'] * 1000:.0f} ms",
                  f"{res['tpot_seconds'] * 1000:.1f} ms", "-" if predicted is None else f"{predicted * 1000:.1f} ms")  # fmt: skip
    stdout.print(t)


def _plan_flag(plan: str | None) -> bool:
    if plan not in (None, "auto"):
        raise ZipmoeError(f"--plan {plan!r}: the benchmark plans for itself; use --plan auto")
    return plan == "auto"


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
        except ZipmoeError:
            stale = True
        if stale:
            if not quiet:
                stderr.print(f"packing {source} into {path}")
            run_pack(str(source), path, PackOptions(coder=coder, force=True))
        containers[name] = path
    return containers


SERVING_PRESETS = {"qwen-moe-bench": "synthetic:qwen", "deepseek-v2-lite": "synthetic:deepseek"}  # and their routing


@app.command("slices")
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
        str, typer.Option("--budget", help="Expert memory for every method (% of BF16 expert bytes).")
    ] = "30%",
    storage: Annotated[
        Optional[float], typer.Option("--storage", help="Simulated storage speed, GB/s (0: page cache).")
    ] = 1.25,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1)] = 256,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2)] = 32,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", min=1, help="Tokens scored for perplexity.")] = 8192,
    critical_threshold: Annotated[
        Optional[float], typer.Option("--critical-threshold", min=0.0, max=1.0, help="dbsc's threshold.")
    ] = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Generations per method (median TPOT).")] = 3,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Write perplexity vs TPOT here (PNG).")] = None,
    threads: ThreadsOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Bytes read, misses, TPOT and perplexity of lossless, q8, q4, dbsc and dbsc+pcw at one memory budget."""
    from zipmoe.bench.slices import FIRST_DECODE_TOKENS, plot, run_slice_bench
    from zipmoe.demo import cached_container, trained_checkpoint
    from zipmoe.quant.spec import SliceSpec

    prepare_codecs(quiet or json_output)
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
        container, content, budget=budget, storage_gbps=storage or None, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, eval_tokens=eval_tokens, threshold=critical_threshold, repeat=repeat,
        threads=threads, device=device, on_step=None if quiet or json_output else (lambda s: stderr.print(s)),
    )  # fmt: skip
    if plot_path is not None:
        plot(report, plot_path)
    if json_output:
        print_json(report.to_json())
        return
    s = report.settings
    q8 = report.row("q8")
    storage_label = "page cache" if s["storage_gbps"] is None else f"{s['storage_gbps']:g} GB/s"
    t = table("method", "perplexity", "vs q8", "decode bytes read", "vs q8", "decode miss rate",
              f"slice misses, first {FIRST_DECODE_TOKENS} tokens", "TPOT", "vs q8",
              title=f"{container.name}: budget {s['budget']}, storage {storage_label}, prompt {s['prompt_tokens']} "
              f"tokens, {s['new_tokens']} new, {s['device']}")  # fmt: skip
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
    stdout.print(t)
    for target, measured, met in report.targets():
        stdout.print(styled("met", "green") if met else styled("not met", "red"), f" {target}: {measured}", sep="")
    if plot_path is not None:
        stdout.print(f"plot: {plot_path}")
