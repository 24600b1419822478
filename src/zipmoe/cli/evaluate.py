"""``zipmoe eval ppl``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zipmoe.cli._options import ContainerArg, JsonOpt, QuietOpt, ThreadsOpt
from zipmoe.cli._output import prepare_codecs, print_json, progress_bar, stdout, table
from zipmoe.errors import ZipmoeError
from zipmoe.evaluate import DEFAULT_CONTEXT
from zipmoe.runtime.policies import DEFAULT_THRESHOLD

app = typer.Typer(
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

  zipmoe eval ppl sliced.zmoe --text wiki.txt                    # every mode: SliceMoE's Table 1 for this model

  zipmoe eval ppl sliced.zmoe --text wiki.txt --mode lossless,q4 --context 1024 --max-tokens 20000
""",
)
def ppl(
    container: ContainerArg,
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text file to score.", show_default=False)],
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="Comma-separated modes: lossless, q8, q4, dbsc (with MAT(8,4) slices), q4-base (4-bit, quantized "
            "on its own), q4-trunc (naive truncation); all: every one the container offers.",
        ),
    ] = "all",
    context: Annotated[int, typer.Option("--context", min=2, help="Tokens per forward pass.")] = DEFAULT_CONTEXT,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Score at most this many.")] = None,
    memory_budget: Annotated[
        Optional[str], typer.Option("--memory-budget", "-m", help="Expert memory, as for zipmoe run (default: all).")
    ] = None,
    critical_threshold: Annotated[
        float, typer.Option("--critical-threshold", min=0.0, max=1.0, help="dbsc: as for zipmoe run.")
    ] = DEFAULT_THRESHOLD,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto.")] = "auto",
    threads: ThreadsOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity of the container's model on a text in each precision mode, against lossless BF16."""
    from zipmoe.evaluate import perplexity, table1_modes
    from zipmoe.formats.reader import Container
    from zipmoe.runtime.engine import EngineOptions

    if not Path(container).is_file():
        raise ZipmoeError(f"{container}: no such file")
    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ZipmoeError(f"{text}: cannot read it as UTF-8 text ({exc})") from None
    with Container(container) as c:
        spec = c.slice_spec
    modes = table1_modes(spec) if mode == "all" else [m.strip() for m in mode.split(",") if m.strip()]
    prepare_codecs(quiet or json_output)
    options = EngineOptions(device=device, memory_budget=memory_budget, threads=threads,
                            critical_threshold=critical_threshold)  # fmt: skip
    with progress_bar(f"Scoring {text.name}", quiet or json_output, unit="windows") as (start, advance):
        results = perplexity(container, content, modes, context=context, max_tokens=max_tokens, options=options,
                             progress_start=start, progress=advance)  # fmt: skip
    reference = next((r for r in results if r.mode == "lossless"), None)
    if json_output:
        print_json({"container": str(container), "text": str(text), "context": context,
                    "results": [r.to_json() for r in results]})  # fmt: skip
        return
    high, low = (spec.high_bits, spec.low_bits) if spec else (None, None)
    t = table("mode", "weights", "perplexity", "vs lossless", "tokens", "seconds", title=f"{container}: {text.name}")
    for r in results:
        ratio = f"{r.perplexity / reference.perplexity:.3f}x" if reference else "-"
        t.add_row(r.mode, describe(r.mode, high, low), f"{r.perplexity:.3f}", ratio, str(r.tokens), f"{r.seconds:.1f}")
    stdout.print(t)
