"""The ``zipmoe`` application: one Typer factory, every command registered here, one error funnel in `main`."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated

import typer

from zipmoe import __version__
from zipmoe.cli._options import ZipmoeGroup
from zipmoe.cli._output import stderr, styled
from zipmoe.errors import ZipmoeError

app = typer.Typer(
    cls=ZipmoeGroup,  # old flag spellings as hidden aliases, tidy help (zipmoe.cli._options)
    name="zipmoe",
    help="Pack Mixture-of-Experts checkpoints into verified, memory-mappable containers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)


def _version(value: bool) -> None:
    if value:
        print(f"zipmoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Pack Mixture-of-Experts checkpoints into verified, memory-mappable containers."""


# The command modules of zipmoe.cli, one line each. A module defines NAME, EPILOG and `command`, or COMMANDS, a list of
# (name, epilog, function) for several commands. Their top-level imports stay light (typer, zipmoe.cli._options,
# zipmoe.cli._output, zipmoe.errors; heavy ones inside the functions): `zipmoe --help` imports every one of them and
# must load neither numba nor torch (tests/test_startup.py checks).
COMMAND_MODULES = (
    "pack",
    "verify",
    "inspect",
    "unpack",
    "plan",
    "run",
    "chat",
    "serve",
    "models",  # pull, list, rm
    "demo",
)
GROUP_MODULES = {"bench": "bench", "eval": "evaluate"}  # command group -> module defining its typer `app`

for _name in COMMAND_MODULES:
    _module = importlib.import_module(f"zipmoe.cli.{_name}")
    for _command, _epilog, _function in getattr(_module, "COMMANDS", None) or [
        (_module.NAME, _module.EPILOG, _module.command)
    ]:
        app.command(_command, epilog=_epilog)(_function)
for _group, _name in GROUP_MODULES.items():
    app.add_typer(importlib.import_module(f"zipmoe.cli.{_name}").app, name=_group)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: known errors become one line on stderr and exit status 1; set ZIPMOE_DEBUG=1 for tracebacks.

    Usage errors (a missing argument, an unknown option) are click's: a usage line and exit status 2.
    """
    try:
        app(args=argv, prog_name="zipmoe")
    except KeyboardInterrupt:
        stderr.print("Interrupted.")
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("ZIPMOE_DEBUG"):
            raise
        if isinstance(exc, ZipmoeError):
            message = str(exc)
        elif isinstance(exc, OSError):
            message = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
        elif isinstance(exc, MemoryError):
            message = "out of memory"
        else:  # a bug: still one line, and the way to the traceback
            message = (
                f"internal error ({type(exc).__name__}: {exc}); please report it with the traceback that "
                "ZIPMOE_DEBUG=1 shows"
            )
        # Messages quote names from files (file names, templates): print them as text, never as markup.
        stderr.print(styled("Error:", "red", " " + " ".join(message.split())))
        sys.exit(1)
