"""zipmoe's numba kernels as a whole: load them all (compiling what numba's cache lacks), and say so when compiling.

numba compiles each kernel on first use and keeps the machine code in its on-disk cache (``__pycache__`` next to the
source, or ``NUMBA_CACHE_DIR``); later processes load it in a fraction of a second. Only the first run after
installing (or after an upgrade of numba or zipmoe) compiles, and that takes a while, so the CLI prints one line then.
It knows from numba itself: numba broadcasts a ``numba:compile`` event (`numba.core.event`) only after a cache miss,
just before it compiles, never when it loads a kernel from the cache. ``make install`` runs
``python -m zipmoe._kernels`` so that no command has to compile.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

COMPILING = "Compiling zipmoe's kernels (once after installing; a minute or two) ..."


def warm_up() -> None:
    """Load every kernel variant that pack, verify, unpack, run and eval use, compiling what the cache lacks."""
    from zipmoe.codecs.parts import warm_up as warm_up_codecs
    from zipmoe.quant.amat import warm_up as warm_up_quant

    warm_up_codecs()
    warm_up_quant()


@contextmanager
def on_first_compile(announce: Callable[[], None]) -> Iterator[None]:
    """Call ``announce`` once, just before numba compiles its first function inside the block (a cache miss);
    never when every function comes from numba's cache or the JIT is off (``NUMBA_DISABLE_JIT=1``)."""
    from numba.core import event

    announced: list[bool] = []

    class _FirstCompile(event.Listener):
        def on_start(self, ev: event.Event) -> None:
            if not announced:  # numba compiles under one global lock: no two starts race here
                announced.append(True)
                announce()

        def on_end(self, ev: event.Event) -> None:
            pass

    with event.install_listener("numba:compile", _FirstCompile()):
        yield


def prepare(announce: Callable[[], None] | None = None) -> bool:
    """`warm_up`, calling ``announce`` first if numba has to compile; returns whether it compiled."""
    compiled: list[bool] = []

    def first() -> None:
        compiled.append(True)
        if announce:
            announce()

    with on_first_compile(first):
        warm_up()
    return bool(compiled)


def main() -> None:
    """``python -m zipmoe._kernels``: compile the kernels now (``make install`` runs it), saying how long it took."""
    started = time.perf_counter()
    if prepare(lambda: print(COMPILING, file=sys.stderr, flush=True)):
        print(f"zipmoe's kernels compiled and cached in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    else:
        print("zipmoe's kernels were already compiled and cached", file=sys.stderr)


if __name__ == "__main__":
    main()
