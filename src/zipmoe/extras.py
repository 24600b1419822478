"""Optional dependencies: which extra of the package installs each one, and the one-line error when one is missing.

zipmoe's core (codecs, formats, pack, verify, inspect, unpack, demo-checkpoint) needs numpy and numba, not PyTorch.
Serving, evaluating and planning need PyTorch, tokenizers and Jinja2 (``pip install 'zipmoe[run]'``); benchmarks also
need their baselines and plots (``pip install 'zipmoe[bench]'``); ``zipmoe serve`` needs Starlette and uvicorn
(``pip install 'zipmoe[serve]'``). Commands call `require` before their heavy imports,
so a missing package is one line that names the command and the install command, not an ImportError from deep inside
the runtime. The check looks the package up without importing it, so it costs nothing when the package is there.
"""

from __future__ import annotations

from importlib.util import find_spec

from zipmoe.errors import ZipmoeError

# import name -> (the name users know it by, the extra that installs it)
PACKAGES = {
    "torch": ("PyTorch", "run"),
    "tokenizers": ("tokenizers", "run"),
    "jinja2": ("Jinja2", "run"),
    "transformers": ("transformers", "bench"),
    "accelerate": ("accelerate", "bench"),
    "matplotlib": ("matplotlib", "bench"),
    "zipnn": ("zipnn", "bench"),
    "starlette": ("Starlette", "serve"),
    "uvicorn": ("uvicorn", "serve"),
}
RUNTIME = ("torch", "tokenizers", "jinja2")  # what `zipmoe run` and everything built on its runtime import
SERVE = ("starlette", "uvicorn")  # what `zipmoe serve` adds (the [serve] extra includes [run])


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (``sys.modules[module] = None`` counts as absent)."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or the module's entry is None
        return False


def require(feature: str, *modules: str) -> None:
    """Fail with one line when a package that ``feature`` needs is not installed.

    Args:
        feature: what needs the packages, as users call it (``zipmoe run``, ``--plot``).
        modules: import names (those of `PACKAGES` are named as users know them, others by import name).

    Raises:
        ZipmoeError: ``zipmoe run needs PyTorch: pip install 'zipmoe[run]'``: the first missing package, and the extra
            that installs all of ``modules`` (``bench`` and ``serve`` include ``run``).
    """
    absent = [m for m in modules if not installed(m)]
    if absent:
        known = [PACKAGES.get(m, (m, "run")) for m in (absent[0], *modules)]  # (name, extra)
        extras = {e for _, e in known}
        extra = next((e for e in ("bench", "serve") if e in extras), "run")  # each of these includes run
        raise ZipmoeError(f"{feature} needs {known[0][0]}: pip install 'zipmoe[{extra}]'")
