"""``zipmoe demo-checkpoint``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zipmoe.cli._options import ForceOpt, JsonOpt, QuietOpt, choice
from zipmoe.cli._output import human_bytes, print_json, stdout
from zipmoe.demo import PRESETS, build_demo_checkpoint

NAME = "demo-checkpoint"
EPILOG = """Examples:

  zipmoe demo-checkpoint build/demo-model && zipmoe pack build/demo-model -o build/demo.zmoe

  zipmoe demo-checkpoint /tmp/tiny --preset tiny --seed 1 --json | jq '.bytes'

The weights are random (seeded): the checkpoint exercises packing and serving, but generates no sensible text.
"""


def command(
    directory: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.", show_default=False)],
    preset: Annotated[str, typer.Option("--preset", **choice(PRESETS), help="Model size.")] = "small",
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Random seed of the weights.")] = 0,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a random-init MoE checkpoint in Hugging Face layout (offline, for demos, tests and benchmarks)."""
    out = build_demo_checkpoint(directory, preset, seed, force)
    files = sorted(p for p in out.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    family = PRESETS[preset].family
    if json_output:
        print_json({"directory": str(out), "family": family, "preset": preset, "seed": seed, "bytes": total,
                    "files": [{"name": p.name, "bytes": p.stat().st_size} for p in files]})  # fmt: skip
    elif not quiet:
        stdout.print(
            f"Wrote {out}: {len(files)} files, {human_bytes(total)} ({family}, preset {preset!r}, seed {seed})"
        )
