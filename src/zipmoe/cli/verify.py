"""``zipmoe verify``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from zipmoe.cli._checks import check_container
from zipmoe.cli._options import ContainerArg, JsonOpt, QuietOpt, ThreadsOpt
from zipmoe.cli._output import human_bytes, prepare_codecs, print_json, progress_bar, stderr, stdout, styled

NAME = "verify"
EPILOG = """Examples:

  zipmoe verify mixtral.zmoe

  zipmoe verify mixtral.zmoe --source ./Mixtral-8x7B-v0.1     # also compare bit for bit with the source

Exit status: 0 when everything checks out, 1 otherwise.
"""

_MAX_LISTED = 50


def command(
    container: ContainerArg,
    source: Annotated[
        Optional[str],
        typer.Option("--source", "-s", help="Checkpoint directory or Hub id to compare with bit for bit."),
    ] = None,
    threads: ThreadsOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check structure, every checksum, and that every tensor decodes to its source (SHA-256, or bit for bit)."""
    from zipmoe.formats.checkpoint import check_source

    check_container(container)  # before numba loads: a mistyped path fails at once
    if source is not None:
        check_source(source)
    from zipmoe.verify import verify as run_verify

    prepare_codecs(quiet)
    with progress_bar(f"Verifying {container}", quiet) as (start, advance):
        report = run_verify(container, source, threads=threads, progress_start=start, progress=advance)
    if json_output:
        print_json(report.to_json())
        if not report.ok:
            raise typer.Exit(1)
        return
    against = f"bit for bit against {report.source}" if report.source else "against the recorded SHA-256 of each tensor"
    summary = (
        f"{report.n_tensors} tensors ({report.n_parts} parts, {report.n_chunks} chunks, "
        f"{human_bytes(report.decoded_bytes)}) and {report.n_files} files checked {against}"
    )
    if report.n_slices:
        summary += f"; {report.n_slices} AMAT slices match the weights quantized again"
    if report.ok:
        stdout.print(styled("OK", "green", f" {report.path}: {summary}"))
        return
    for failure in report.failures[:_MAX_LISTED]:
        stdout.print(styled("FAIL", "red", f" {failure}"))
    if len(report.failures) > _MAX_LISTED:
        stdout.print(f"... and {len(report.failures) - _MAX_LISTED} more")
    stderr.print(styled("Error:", "red", f" {report.path}: {len(report.failures)} problem(s) found; {summary}"))
    raise typer.Exit(1)
