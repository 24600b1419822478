"""``zipmoe eval ppl``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from zipmoe.cli._options import DeviceOpt, JsonOpt, ModelArg, QuietOpt, ThreadsOpt, ZipmoeGroup, eval_tokens
from zipmoe.cli._options import memory_budget as memory_budget_option
from zipmoe.cli._output import prepare_codecs, print_json, progress_bar, stdout, table, warn
from zipmoe.errors import ZipmoeError
from zipmoe.evaluate import DEFAULT_CONTEXT, MIN_SCORED_TOKENS, PerplexityResult
from zipmoe.runtime.policies import DEFAULT_THRESHOLD

app = typer.Typer(
    cls=ZipmoeGroup,
    help="Model quality of a container's precision modes.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)

_DESCRIBE = {
    "lossless": "BF16 experts (lossless)",
    "dbsc": "AMAT: critical experts high, others low",
}


def describe(mode: str, high: int | None, low: int | None) -> str:
    if mode in _DESCRIBE:
        return _DESCRIBE[mode]
    if mode.endswith("-base"):
        return f"{mode[1:-5]}-bit, quantized on its own (Base)"
    if mode.endswith("-trunc"):
        return f"{mode[1:-6]}-bit, naive truncation (zero-point kept)"
    return f"AMAT {mode[1:]}-bit" + (
        " (MSB slice)" if mode == f"q{low}" else " (MSB+LSB)" if mode == f"q{high}" else ""
    )


@app.command(
    "ppl",
    epilog="""Examples:

  zipmoe eval ppl sliced.zmoe --text wiki.txt          # every mode: SliceMoE's Table 1 for this model

  zipmoe eval ppl sliced.zmoe --text wiki.txt --mode lossless,q4 --context 1024 --eval-tokens 20000

  zipmoe eval ppl model.zmoe --text wiki.txt --mode lossless -m 25% --json | jq '.results[0]'

Each perplexity comes with its standard error (ppl * the standard error of the mean token NLL, as
llama-perplexity reports it); fewer than 512 scored tokens give a warning.
""",
)
def ppl(
    container: ModelArg,
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text file to score.", show_default=False)],
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            metavar="all|MODE,...",
            help="Comma-separated modes: lossless, q8, q4, dbsc (with MAT(8,4) slices), q4-base (4-bit, quantized "
            "on its own), q4-trunc (naive truncation); all: every one the container offers.",
        ),
    ] = "all",
    context: Annotated[int, typer.Option("--context", min=2, help="Tokens per forward pass.")] = DEFAULT_CONTEXT,
    max_tokens: Annotated[
        Optional[int], eval_tokens("Score at most this many tokens (default: the whole text).")
    ] = None,
    memory_budget: Annotated[
        Optional[str], memory_budget_option("Expert memory, as for zipmoe run: 2GiB, 500MB or 50% (default: all).")
    ] = None,
    critical_threshold: Annotated[
        float, typer.Option("--critical-threshold", min=0.0, max=1.0, help="dbsc: as for zipmoe run.")
    ] = DEFAULT_THRESHOLD,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity of the container's model on a text in each precision mode, against lossless BF16, with its
    standard error."""
    from zipmoe.cli.models import model_container
    from zipmoe.extras import RUNTIME, require

    require("zipmoe eval ppl", *RUNTIME)
    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ZipmoeError(f"{text}: cannot read it as UTF-8 text ({exc})") from None
    container = model_container(container, quiet=quiet)  # a directory or Hub repo: packed into the store once
    from zipmoe.evaluate import perplexity, table1_modes
    from zipmoe.formats.reader import Container
    from zipmoe.runtime.engine import EngineOptions

    with Container(container) as c:
        spec = c.slice_spec
    modes = table1_modes(spec) if mode == "all" else [m.strip() for m in mode.split(",") if m.strip()]
    prepare_codecs(quiet)
    options = EngineOptions(device=device, memory_budget=memory_budget, threads=threads,
                            critical_threshold=critical_threshold)  # fmt: skip
    with progress_bar(f"Scoring {text.name}", quiet or json_output, unit="windows") as (start, advance):
        results = perplexity(container, content, modes, context=context, max_tokens=max_tokens, options=options,
                             progress_start=start, progress=advance)  # fmt: skip
    reference = next((r for r in results if r.mode == "lossless"), None)
    scored = results[0].tokens if results else 0
    warnings = []
    if scored < MIN_SCORED_TOKENS:
        warnings.append(
            f"only {scored} tokens scored (fewer than {MIN_SCORED_TOKENS}): the perplexities are too noisy to tell "
            "modes apart; score a longer text (--text, --eval-tokens)"
        )
    if not quiet:
        for message in warnings:
            warn(message)
    if json_output:
        print_json({"container": str(container), "text": str(text), "context": context,
                    "results": [r.to_json() for r in results], "warnings": warnings})  # fmt: skip
        return
    high, low = (spec.high_bits, spec.low_bits) if spec else (None, None)
    t = table("mode", "weights", "perplexity ± s.e.", "vs lossless", "tokens", "seconds",
              title=f"{container}: {text.name}")  # fmt: skip
    for r in results:
        ratio = f"{r.perplexity / reference.perplexity:.3f}x" if reference else "-"
        t.add_row(r.mode, describe(r.mode, high, low), _with_stderr(r), ratio, str(r.tokens), f"{r.seconds:.1f}")
    stdout.print(t)


def _with_stderr(result: PerplexityResult) -> str:
    """``12.345 ± 0.067``: the perplexity and its standard error (none from a single token)."""
    spread = result.perplexity_stderr
    return f"{result.perplexity:.3f} ± {spread:.3f}" if math.isfinite(spread) else f"{result.perplexity:.3f}"
