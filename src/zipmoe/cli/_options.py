"""Option aliases shared by the commands, so every command spells the same option the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ContainerArg = Annotated[Path, typer.Argument(help="A .zmoe container.", show_default=False)]
SourceArg = Annotated[
    str, typer.Argument(help="Checkpoint directory, or Hub repo id org/name[@revision].", show_default=False)
]
ThreadsOpt = Annotated[
    Optional[int], typer.Option("--threads", "-t", min=1, help="Worker threads (default: every available CPU).")
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, for scripts.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or warnings on stderr.")]
