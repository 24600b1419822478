"""Option aliases shared by the commands, so every command spells the same option the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ContainerArg = Annotated[Path, typer.Argument(help="A .zmoe container.", show_default=False)]
SourceArg = Annotated[
    str, typer.Argument(help="Checkpoint directory, or Hub repo id org/name[@revision].", show_default=False)
]
MAX_THREADS = 1024  # more threads than any machine has CPUs only wastes memory (100,000 made torch abort)
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", "-t", min=1, max=MAX_THREADS, help="Worker threads (default: every available CPU)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, for scripts.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or warnings on stderr.")]
