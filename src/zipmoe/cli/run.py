"""``zipmoe run``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from zipmoe.cli._options import ContainerArg, JsonOpt, ThreadsOpt
from zipmoe.cli._output import human_bytes, percent, prepare_codecs, print_json, stderr, table, warn
from zipmoe.errors import ZipmoeError
from zipmoe.runtime.policies import DEFAULT_THRESHOLD

NAME = "run"
EPILOG = """Examples:

  zipmoe run mixtral.zmoe "The capital of France is" --max-new-tokens 32

  zipmoe run qwen-moe.zmoe "Write a haiku about caches" --chat --memory-budget 8GiB --temperature 0.7 --seed 1

  zipmoe run model.zmoe "Hello" --memory-budget 50% --simulate-storage 1.25     # phone-flash speed, simulated

  zipmoe run sliced.zmoe "def fib(n):" --mode dbsc --memory-budget 25%          # packed with --slices 8:4

The generated text goes to stdout as it is produced; the statistics table goes to stderr.
"""


def command(
    container: ContainerArg,
    prompt: Annotated[str, typer.Argument(help="The prompt.", show_default=False)],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")] = 64,
    memory_budget: Annotated[
        Optional[str],
        typer.Option(
            "--memory-budget",
            "-m",
            help="Memory for experts: 2GiB, 500MB, or a percentage of the model's BF16 expert bytes (50%). "
            "Default: every expert decoded, up to half of the available memory.",
        ),
    ] = None,
    tiers: Annotated[
        Optional[str],
        typer.Option(
            "--tiers",
            help="Shares of the expert memory per tier: decoded (compute-ready), compressed (whole records), sm "
            "(sign+mantissa planes; a hit reads only the coded exponents), e.g. decoded=0.5,sm=0.5 "
            "(default: decoded=1; see docs/RUNTIME.md).",
        ),
    ] = None,
    decoded_fraction: Annotated[
        Optional[float], typer.Option("--decoded-fraction", min=0.0, max=1.0, hidden=True)
    ] = None,  # the old spelling of --tiers decoded=F,compressed=1-F
    policy: Annotated[
        str, typer.Option("--policy", help="What the tiers keep: lfu (token-weighted, ZipMoE's), or lru.")
    ] = "lfu",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto.")] = "auto",
    dtype: Annotated[
        Optional[str],
        typer.Option(
            "--dtype",
            help="Compute dtype: float32, bfloat16 or float16 (default: bfloat16 on GPUs and "
            "BF16-capable CPUs, float32 elsewhere).",
        ),
    ] = None,  # fmt: skip
    threads: ThreadsOpt = None,
    io: Annotated[
        str,
        typer.Option("--io", help="How experts are read: buffered (through the page cache) or direct (O_DIRECT)."),
    ] = "buffered",
    simulate_storage: Annotated[
        Optional[float],
        typer.Option(
            "--simulate-storage", help="Simulate storage of this bandwidth in GB/s (e.g. 3.5 NVMe, 1.25 phone flash)."
        ),
    ] = None,
    plan: Annotated[
        Optional[str],
        typer.Option(
            "--plan",
            help="A plan from zipmoe plan for this container (sets the tiers, pins and prefetches the planned "
            "experts), or auto (plan now from the architecture's synthetic routing).",
        ),
    ] = None,
    schedule: Annotated[
        Optional[str],
        typer.Option(
            "--schedule",
            help="Order of a layer's fetches: affinity (reads and decodes interleaved, ZipMoE's; the default with "
            "--plan) or fifo (expert order; the default otherwise).",
        ),
    ] = None,
    record_routing: Annotated[
        Optional[Path],
        typer.Option(
            "--record-routing",
            help="Write the experts every token was routed to, as a zipmoe-routing JSON Lines trace "
            "(for zipmoe bench run --routing).",
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="lossless (BF16 experts), or from AMAT slices (pack --slices 8:4): q8, q4, or dbsc (the top expert "
            "of a confident token at 8 bits, the others at 4).",
        ),
    ] = "lossless",
    critical_threshold: Annotated[
        float,
        typer.Option(
            "--critical-threshold",
            min=0.0,
            max=1.0,
            help="dbsc: a selected expert runs at high precision when its router probability is at least this "
            "(at most two per token).",
        ),
    ] = DEFAULT_THRESHOLD,
    warmup: Annotated[
        str,
        typer.Option(
            "--warmup",
            help="Slice modes, what the cache holds when decoding starts: pcw (the slices the prompt used most), "
            "last-layer (what LRU left), random, or empty.",
        ),
    ] = "pcw",
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed for sampling.")] = 0,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap the prompt as a user message with the chat template.")
    ] = False,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at the end-of-sequence token.")] = False,
    truncate: Annotated[
        bool,
        typer.Option(
            "--truncate",
            help="Keep the last prompt tokens that leave room for --max-new-tokens in the model's context "
            "(default: a prompt that does not fit is an error).",
        ),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Generate text from a container, holding only part of its experts in memory."""
    from zipmoe.runtime.engine import Engine, EngineOptions, check_prompt, expert_bytes_summary
    from zipmoe.runtime.generate import SamplingOptions

    check_prompt(prompt)
    if not Path(container).is_file():
        raise ZipmoeError(f"{container}: no such file")
    if decoded_fraction is not None and tiers is None:
        tiers = f"decoded={decoded_fraction},compressed={1 - decoded_fraction}"
    options = EngineOptions(
        device=device, dtype=dtype, memory_budget=memory_budget, tiers=tiers, policy=policy, threads=threads, io=io,
        simulate_storage_gbps=simulate_storage, mode=mode, critical_threshold=critical_threshold, warmup=warmup,
        plan=plan, schedule=schedule,
    )  # fmt: skip
    sampling = SamplingOptions(max_new_tokens, temperature, top_p, seed, stop_at_eos=not ignore_eos, truncate=truncate)
    prepare_codecs(quiet=json_output)
    with Engine(container, options) as engine:
        if engine.storage.warning:
            warn(engine.storage.warning)
        recorder = engine.record_routing() if record_routing is not None else None
        on_text = None if json_output else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        text, result = engine.generate_text(prompt, sampling, chat=chat, on_text=on_text)
        if recorder is not None:
            recorder.end_request()
            recorder.write(record_routing)
        stats = engine.pipeline.stats
        if result.dropped_tokens:
            warn(
                f"--truncate: the prompt's first {result.dropped_tokens} tokens were left out; the model saw its last "
                f"{result.prompt_tokens} (context {engine.args.context} tokens)"
            )
        doc = {
            "text": text,
            "prompt_tokens": result.prompt_tokens,
            "dropped_prompt_tokens": result.dropped_tokens,
            "new_tokens": len(result.tokens),
            "ttft_seconds": result.ttft,
            "tpot_seconds": result.tpot,
            "tokens_per_second": result.tokens_per_second,
            "memory_budget_bytes": engine.budget,
            "tiers_bytes": {kind: engine.tiers.capacity(kind) for kind in engine.tiers.kinds},
            "dense_bytes": engine.dense_bytes,
            "cache": stats.to_json(),
            "model": expert_bytes_summary(engine),
        }
    if json_output:
        print_json(doc)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    t = table("", "value", title="zipmoe run")
    t.add_row("tokens (prompt / new)", f"{doc['prompt_tokens']} / {doc['new_tokens']}")
    t.add_row("time to first token", f"{result.ttft * 1000:.0f} ms")
    t.add_row("time per output token", f"{result.tpot * 1000:.1f} ms" if result.step_seconds else "-")
    t.add_row("tokens/s", f"{result.tokens_per_second:.2f}" if result.step_seconds else "-")
    t.add_row("mode", doc["model"]["mode"])
    if mode != "lossless":
        for kind in ("msb", "lsb"):
            hits, misses = stats.hits.get(kind, 0), stats.misses.get(kind, 0)
            t.add_row(
                f"{kind.upper()} slices: hits / misses", f"{hits} / {misses} ({percent(stats.miss_rate(kind))} miss)"
            )
        t.add_row("expert runs: high / low precision", f"{stats.computed['high']} / {stats.computed['low']}")
        if mode == "dbsc":
            t.add_row("tokens with a critical expert", percent(doc["cache"]["critical_fraction"]))
    else:
        for where, label in (("decoded", "experts served decoded"), ("compressed", "experts served from records"),
                             ("sm", "experts served from sign-mantissa planes"),
                             ("storage", "experts read from storage")):  # fmt: skip
            if where in stats.served_from or where in ("decoded", "storage"):
                t.add_row(label, f"{stats.served_from.get(where, 0)} ({percent(stats.rate(where))})")
        t.add_row("bytes decoded", human_bytes(stats.bytes_decoded))
        if stats.storage_busy is not None:
            t.add_row("storage busy in miss-heavy layers", percent(stats.storage_busy))
    t.add_row("bytes read from storage", human_bytes(stats.total_bytes_read))
    t.add_row(
        "expert memory (peak / budget)", f"{human_bytes(stats.peak_bytes)} / {human_bytes(doc['memory_budget_bytes'])}"
    )
    t.add_row("dense weights (resident)", human_bytes(doc["dense_bytes"]))
    t.add_row("device / dtype", f"{doc['model']['device']} / {doc['model']['dtype']}")
    stderr.print(t)
