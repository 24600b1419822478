"""``zipmoe unpack``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zipmoe.cli._checks import check_container
from zipmoe.cli._options import ContainerArg, ForceOpt, JsonOpt, QuietOpt, ThreadsOpt
from zipmoe.cli._output import human_bytes, prepare_codecs, print_json, progress_bar, stdout, table

NAME = "unpack"
EPILOG = """Examples:

  zipmoe unpack mixtral.zmoe -o ./Mixtral-8x7B-v0.1     # byte-identical safetensors, config and tokenizer files
"""


def command(
    container: ContainerArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the checkpoint into.")],
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the packed checkpoint back out, byte-identical to the original files (SHA-256 checked)."""
    check_container(container)  # before numba loads: a mistyped path fails at once
    from zipmoe.unpack import unpack as run_unpack

    prepare_codecs(quiet)
    with progress_bar(f"Unpacking {container}", quiet) as (start, advance):
        files = run_unpack(container, output, force=force, threads=threads, progress_start=start, progress=advance)
    if json_output:
        print_json(
            {
                "directory": str(output),
                "files": [{"name": f.name, "bytes": f.nbytes, "sha256": f.sha256} for f in files],
            }
        )
        return
    t = table("file", "size", "sha256", title=f"{output}: {len(files)} files, SHA-256 equal to the packed originals")
    for f in files:
        t.add_row(f.name, human_bytes(f.nbytes), f.sha256[:16] + "…")
    stdout.print(t)
