"""`zipmoe bench startup`: how long zipmoe takes to answer before it does any work, against ``python -c pass``.

Every case is a fresh child process of this Python interpreter (``python -m zipmoe ...``, the same code the
``zipmoe`` script runs), timed from spawn to exit; the median of ``repeat`` runs is kept, after one untimed run that
warms the file cache. One more run per case records which heavy libraries the process imported: ``--help``, usage
errors and a missing source must load neither torch nor numba.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zipmoe.errors import ZipmoeError

HEAVY_MODULES = ("torch", "numba", "transformers", "matplotlib")
# (name, arguments of the Python interpreter, the exit status a working zipmoe gives)
CASES: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("python -c pass", ("-c", "pass"), 0),
    ("import zipmoe", ("-c", "import zipmoe"), 0),
    ("zipmoe --help", ("-m", "zipmoe", "--help"), 0),
    ("zipmoe pack --help", ("-m", "zipmoe", "pack", "--help"), 0),
    ("zipmoe run --help", ("-m", "zipmoe", "run", "--help"), 0),
    ("zipmoe pack ./missing", ("-m", "zipmoe", "pack", "./missing"), 1),
)
# Runs a case in-process after the timed runs and prints the heavy modules it left in sys.modules.
_PROBE = """
import runpy, sys
args = sys.argv[1:]
try:
    if args[0] == "-c":
        exec(args[1], {"__name__": "__main__"})
    else:
        sys.argv = ["zipmoe", *args[2:]]
        runpy.run_module("zipmoe", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    print("\\nheavy:", *(m for m in %r if m in sys.modules), file=sys.__stderr__)
"""


@dataclass(frozen=True)
class StartupRow:
    """One case: the wall times of its runs, in seconds, and what it imported."""

    name: str
    seconds: list[float]
    loaded: list[str] = field(default_factory=list)  # of HEAVY_MODULES

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_json(self, baseline: float) -> dict[str, Any]:
        return {
            "case": self.name,
            "median_seconds": self.median,
            "min_seconds": min(self.seconds),
            "runs": len(self.seconds),
            "vs_python": self.median / baseline if baseline else None,
            "heavy_modules_loaded": self.loaded,
        }


def run_startup_bench(repeat: int = 7, on_case: Callable[[str], None] | None = None) -> list[StartupRow]:
    """Time every case of `CASES` ``repeat`` times (median kept) in a scratch directory, first row the baseline.

    Raises:
        ZipmoeError: a case exited with another status than a working zipmoe gives (its last line of stderr).
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="zipmoe-startup-") as scratch:  # where ./missing is missing
        for name, args, status in CASES:
            if on_case:
                on_case(name)
            _run(name, args, status, scratch)  # untimed: the first run reads the files from disk
            seconds = []
            for _ in range(repeat):
                started = time.perf_counter()
                _run(name, args, status, scratch)
                seconds.append(time.perf_counter() - started)
            probe = _run(name, ("-c", _PROBE % (HEAVY_MODULES,), *args), None, scratch)
            _, marker, loaded = probe.stderr.rpartition("\nheavy:")
            if not marker:
                raise ZipmoeError(f"bench startup: {name!r} did not finish in-process: {probe.stderr.strip()[-300:]}")
            rows.append(StartupRow(name, seconds, loaded.split()))
    return rows


def _run(name: str, args: tuple[str, ...], status: int | None, cwd: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if status is not None and done.returncode != status:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ZipmoeError(f"bench startup: {name!r} exited with status {done.returncode}, expected {status}: {last}")
    return done
