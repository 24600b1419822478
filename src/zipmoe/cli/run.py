"""``zipmoe run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zipmoe.cli._engine_options import (
    CriticalThresholdOpt,
    DecodedFractionOpt,
    DeviceOpt,
    DtypeOpt,
    FrequencyPenaltyOpt,
    IoOpt,
    MaxNewTokensOpt,
    MemoryBudgetOpt,
    MinPOpt,
    ModeOpt,
    PlanOpt,
    PolicyOpt,
    PresencePenaltyOpt,
    RepetitionPenaltyOpt,
    ScheduleOpt,
    SeedOpt,
    SimulateStorageOpt,
    StopOpt,
    TemperatureOpt,
    TiersOpt,
    TopKOpt,
    TopPOpt,
    WarmupOpt,
)
from zipmoe.cli._options import JsonOpt, ModelArg, QuietOpt, ThreadsOpt
from zipmoe.cli._output import human_bytes, percent, prepare_codecs, print_json, stderr, table, warn
from zipmoe.errors import ZipmoeError
from zipmoe.runtime.policies import DEFAULT_THRESHOLD

NAME = "run"
EPILOG = """Examples:

  zipmoe run mixtral.zmoe "The capital of France is" --max-new-tokens 32

  zipmoe run qwen-moe.zmoe "Write a haiku about caches" --chat --memory-budget 8GiB --temperature 0.7 --seed 1

  zipmoe run model.zmoe "Hello" --memory-budget 50% --storage 1.25     # phone-flash speed, simulated

  zipmoe run sliced.zmoe "def fib(n):" --mode dbsc --memory-budget 25%          # packed with --slices 8:4

  git diff | zipmoe run model.zmoe - --chat          # the prompt from stdin (one trailing newline dropped)

  zipmoe run model.zmoe --file prompt.txt --json     # the prompt from a file; --json adds finish_reason: stop|length

  zipmoe run model.zmoe --prompts batch.jsonl > results.jsonl   # {"prompt": "...", "max_new_tokens": 16} per line

  zipmoe run model.zmoe "Q: What is 2+2? A:" --stop "Q:" --temperature 0.7 --top-k 40 --repetition-penalty 1.1

The generated text goes to stdout as it is produced; the statistics table goes to stderr. With --prompts, every
prompt runs on one loaded model with its expert cache kept warm, and each result is one JSON line on stdout (id,
text, tokens, finish_reason, timings and that prompt's cache statistics), in input order; the whole file is checked
first, and a bad line is an error naming it.

Sampling flags left unset take the container's generation_config.json values (greedy unless it sets do_sample);
the order they apply in is in docs/RUNTIME.md.
"""

# `finish_reason` values (OpenAI's) as the table shows them.
FINISH_LABELS = {"stop": "stop (end-of-sequence token)", "length": "length (--max-new-tokens reached)"}
STOP_STRING_LABEL = "stop (a --stop string)"


def command(
    container: ModelArg,
    prompt: Annotated[
        Optional[str],
        typer.Argument(help="The prompt, or - to read it from standard input.", metavar="PROMPT", show_default=False),
    ] = None,
    file: Annotated[
        Optional[Path],
        typer.Option("--file", metavar="FILE", help="Read the prompt from this file (UTF-8).", show_default=False),
    ] = None,
    prompts: Annotated[
        Optional[str],
        typer.Option(
            "--prompts",
            metavar="FILE.jsonl",
            help="Run every prompt of this JSON Lines file (- for standard input) on one loaded model: one "
            '{"prompt": ...} object or string a line, with optional max_new_tokens, the sampling flags (temperature, '
            "top_p, top_k, min_p, repetition_penalty, frequency_penalty, presence_penalty, stop, seed), chat, id; "
            "one JSON result a line on stdout, in order.",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: MaxNewTokensOpt = 64,
    memory_budget: MemoryBudgetOpt = None,
    tiers: TiersOpt = None,
    decoded_fraction: DecodedFractionOpt = None,
    policy: PolicyOpt = "lfu",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    io: IoOpt = "buffered",
    simulate_storage: SimulateStorageOpt = None,
    plan: PlanOpt = None,
    schedule: ScheduleOpt = None,
    record_routing: Annotated[
        Optional[Path],
        typer.Option(
            "--record-routing",
            help="Write the experts every token was routed to, as a zipmoe-routing JSON Lines trace "
            "(for zipmoe bench run --routing).",
        ),
    ] = None,
    mode: ModeOpt = "lossless",
    critical_threshold: CriticalThresholdOpt = DEFAULT_THRESHOLD,
    warmup: WarmupOpt = "pcw",
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    frequency_penalty: FrequencyPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = None,
    stop: StopOpt = None,
    seed: SeedOpt = 0,
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
    quiet: QuietOpt = False,
) -> None:
    """Generate text from a container, holding only part of its experts in memory."""
    from zipmoe.extras import RUNTIME, require

    require("zipmoe run", *RUNTIME)
    from zipmoe.cli._engine_options import engine_options, sampling_flags
    from zipmoe.runtime.request import (
        MAX_BATCH_BYTES,
        STDIN,
        PromptError,
        SamplingOptions,
        check_prompt,
        parse_prompt_requests,
        read_prompt,
        read_source,
    )

    given = {"PROMPT": prompt, "--file": file, "--prompts": prompts}
    sources = [name for name, value in given.items() if value is not None]
    if len(sources) != 1:
        both = f" (not both {sources[0]} and {sources[1]})" if sources else ""
        raise PromptError(f"give one prompt: an argument, - for standard input, --file FILE or --prompts FILE{both}")
    if prompt is not None and prompt != STDIN:
        check_prompt(prompt)
    flags = sampling_flags(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        stop=stop, seed=seed, ignore_eos=ignore_eos, truncate=truncate,
    )  # fmt: skip
    if STDIN in (prompt, prompts) and sys.stdin is not None and sys.stdin.isatty():
        stderr.print("Reading from standard input; end it with Ctrl-D.")
    if prompts is not None:  # the whole file is checked before a model is packed or loaded
        batch = read_source(prompts, MAX_BATCH_BYTES, f"--prompts {prompts}")
        parse_prompt_requests(batch, f"--prompts {prompts}", SamplingOptions(**flags), chat)
    elif prompt is None or prompt == STDIN:
        prompt = read_prompt(STDIN, "standard input") if file is None else read_prompt(file, f"--file {file}")
    from zipmoe.cli.models import model_container

    path = model_container(container)  # a checkpoint directory or Hub repo is packed into the model store once
    options = engine_options(
        device=device, dtype=dtype, memory_budget=memory_budget, tiers=tiers, decoded_fraction=decoded_fraction,
        policy=policy, threads=threads, io=io, simulate_storage=simulate_storage, mode=mode,
        critical_threshold=critical_threshold, warmup=warmup, plan=plan, schedule=schedule,
    )  # fmt: skip
    from zipmoe.runtime.engine import Engine, expert_bytes_summary

    prepare_codecs(quiet)
    with Engine(path, options) as engine:
        if engine.storage.warning and not quiet:
            warn(engine.storage.warning)
        for warning in [] if quiet else engine.generation_warnings:
            warn(warning)
        sampling = engine.default_sampling(**flags)  # unset flags: the container's generation_config.json
        recorder = engine.record_routing() if record_routing is not None else None
        if prompts is not None:  # again, on the container's defaults (checked above: this cannot fail)
            requests = parse_prompt_requests(batch, f"--prompts {prompts}", sampling, chat)
            failed = _run_requests(engine, requests, recorder)
            if recorder is not None:
                recorder.write(record_routing)
            if failed:
                raise ZipmoeError(f'{failed} of {len(requests)} prompts failed (their result lines hold the "error")')
            return
        on_text = None if json_output else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        text, result = engine.generate_text(prompt, sampling, chat=chat, on_text=on_text)
        if recorder is not None:
            recorder.end_request()
            recorder.write(record_routing)
        stats = engine.pipeline.stats
        if result.dropped_tokens and not quiet:
            warn(
                f"--truncate: the prompt's first {result.dropped_tokens} tokens were left out; the model saw its last "
                f"{result.prompt_tokens} (context {engine.args.context} tokens)"
            )
        doc = {
            **_result_json(text, result),
            "memory_budget_bytes": engine.budget,
            "tiers_bytes": {kind: engine.tiers.capacity(kind) for kind in engine.tiers.kinds},
            "dense_bytes": engine.dense_bytes,
            "cache": stats.to_json(),
            "model": expert_bytes_summary(engine),
        }
        eos_ids = engine.eos_ids()
    if json_output:
        print_json(doc)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if quiet:  # the text alone
        return
    t = table("", "value", title="zipmoe run")
    t.add_row("tokens (prompt / new)", f"{doc['prompt_tokens']} / {doc['new_tokens']}")
    t.add_row("time to first token", f"{result.ttft * 1000:.0f} ms")
    t.add_row("time per output token", f"{result.tpot * 1000:.1f} ms" if result.step_seconds else "-")
    t.add_row("tokens/s", f"{result.tokens_per_second:.2f}" if result.step_seconds else "-")
    t.add_row("finish reason", _finish_label(result, sampling, eos_ids))
    t.add_row("mode", doc["model"]["mode"])
    for row in cache_rows(stats, mode):
        t.add_row(*row)
    t.add_row(
        "expert memory (peak / budget)", f"{human_bytes(stats.peak_bytes)} / {human_bytes(doc['memory_budget_bytes'])}"
    )
    t.add_row("dense weights (resident)", human_bytes(doc["dense_bytes"]))
    t.add_row("device / dtype", f"{doc['model']['device']} / {doc['model']['dtype']}")
    stderr.print(t)


def cache_rows(stats, mode: str) -> list[tuple[str, str]]:
    """Table rows saying where the experts came from and what that cost (run's table, chat's ``/stats``).

    Args:
        stats: the expert pipeline's `PipelineStats`.
        mode: the run mode: ``lossless``, or a slice mode (``q8``, ``q4``, ``dbsc``).
    """
    rows = []
    if mode != "lossless":
        for kind in ("msb", "lsb"):
            hits, misses = stats.hits.get(kind, 0), stats.misses.get(kind, 0)
            rows.append(
                (f"{kind.upper()} slices: hits / misses", f"{hits} / {misses} ({percent(stats.miss_rate(kind))} miss)")
            )
        rows.append(("expert runs: high / low precision", f"{stats.computed['high']} / {stats.computed['low']}"))
        if mode == "dbsc":
            rows.append(("tokens with a critical expert", percent(stats.to_json()["critical_fraction"])))
    else:
        for where, label in (("decoded", "experts served decoded"), ("compressed", "experts served from records"),
                             ("sm", "experts served from sign-mantissa planes"),
                             ("storage", "experts read from storage")):  # fmt: skip
            if where in stats.served_from or where in ("decoded", "storage"):
                rows.append((label, f"{stats.served_from.get(where, 0)} ({percent(stats.rate(where))})"))
        rows.append(("bytes decoded", human_bytes(stats.bytes_decoded)))
        if stats.storage_busy is not None:
            rows.append(("storage busy in miss-heavy layers", percent(stats.storage_busy)))
    rows.append(("bytes read from storage", human_bytes(stats.total_bytes_read)))
    return rows


def _finish_label(result, sampling, eos_ids) -> str:
    """Why the generation ended, in words: an end-of-sequence token, a --stop string, or --max-new-tokens."""
    eos = sampling.stop_at_eos and result.tokens and result.tokens[-1] in eos_ids
    if result.finish_reason == "stop" and not eos:
        return STOP_STRING_LABEL
    return FINISH_LABELS.get(result.finish_reason, result.finish_reason)


def _result_json(text: str, result) -> dict[str, Any]:
    """What one generation gave and how fast, as ``--json`` and ``--prompts`` print it; ``usage`` counts tokens as
    the OpenAI API does (the prompt tokens the model saw)."""
    completion = len(result.tokens)
    return {
        "text": text,
        "prompt_tokens": result.prompt_tokens,
        "dropped_prompt_tokens": result.dropped_tokens,
        "new_tokens": completion,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
        },
        "ttft_seconds": result.ttft,
        "tpot_seconds": result.tpot,
        "tokens_per_second": result.tokens_per_second,
    }


def _run_requests(engine, requests, recorder) -> int:
    """Generate for each request in order on one engine (its expert cache stays warm), printing one JSON line each
    as it finishes: the result with the cache statistics of that prompt alone, or its ``error``. Returns how many
    failed; a prompt the model cannot take (too long, a chat template that fails) does not stop the others."""
    from zipmoe.runtime.request import PromptError
    from zipmoe.runtime.tokenizer import TokenizerError

    failed = 0
    for request in requests:
        try:
            text, result = engine.generate_text(request.prompt, request.sampling, chat=request.chat)
        except (PromptError, TokenizerError) as exc:
            failed += 1
            doc = {"id": request.id, "error": str(exc)}
        else:
            if recorder is not None:
                recorder.end_request()
            doc = {"id": request.id, **_result_json(text, result), "cache": result.cache.to_json()}
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
    return failed
