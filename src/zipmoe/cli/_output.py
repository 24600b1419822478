"""Results go to stdout (tables, or JSON with --json); progress, warnings and errors go to stderr.

Every command module imports this one, so it loads only rich's console; progress bars and tables load when drawn.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from rich.table import Table

# Markup is off: names, paths and messages come from files strangers wrote ("[/red]" is a valid file name); styles
# are given as `rich.text.Text` spans (see `styled`).
stdout = Console(highlight=False, soft_wrap=True, markup=False)
stderr = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
if not stdout.is_terminal:  # piped or captured: wide enough that tables keep one line per row
    stdout.width = max(stdout.width, 120)


def human_bytes(n: float) -> str:
    """Decimal units, like the Hub: 1.5 MB, 3.2 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.2f}%"


def styled(label: str, style: str, rest: str = "") -> Text:
    """``label`` in ``style``, then ``rest`` as plain text."""
    return Text.assemble((label, style), rest)


def warn(message: str) -> None:
    stderr.print(styled("Warning:", "yellow", f" {message}"))


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def table(*columns: str, title: str | None = None) -> Table:
    """A results table; columns after the first are right-aligned (they hold numbers)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for i, name in enumerate(columns):
        t.add_column(name, justify="left" if i == 0 else "right")
    return t


@contextmanager
def progress_bar(
    description: str, quiet: bool, unit: str = "bytes"
) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """Yields ``(start(total), advance(n))`` callbacks that drive a rich progress bar on stderr.

    ``unit`` is ``bytes`` (sizes and speed shown) or the name of what is counted (shown as ``3/10 windows``).
    """
    if quiet or not stderr.is_terminal:
        yield (lambda total: None), (lambda n: None)
        return
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counted = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(), TextColumn(unit))
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *counted, TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(escape(description), total=None)
        yield (lambda total: bar.update(task, total=total)), (lambda n: bar.advance(task, n))


def prepare_codecs(quiet: bool) -> None:
    """Load the compiled kernels before timed work starts (call it after checking the command's inputs).

    The first run after installing compiles them, which takes a while: one line on stderr says so then, terminal or
    not, printed when numba starts compiling and never when its cache holds every kernel (`zipmoe._kernels`).
    """
    from zipmoe import _kernels

    _kernels.prepare(None if quiet else (lambda: stderr.print(_kernels.COMPILING)))
