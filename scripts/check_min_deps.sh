#!/usr/bin/env bash
# The lower bounds pyproject.toml declares for zipmoe's torch-free core, checked as CI would: a fresh virtual
# environment with the lowest allowed version of every core dependency (numpy, numba, zstandard, lz4, huggingface-hub,
# typer, rich; numba's own pins decide llvmlite), zipmoe installed without resolving its dependencies again, and the
# core's tests (pack, verify, inspect, unpack, the Hub cache, the CLI's start-up) run against them. No torch.
#
# Usage: scripts/check_min_deps.sh [VENV_DIR]     (default: a new directory under /tmp; reads the package registry)
# PYTHON=python3.10 picks the interpreter (the lowest numba must have wheels for it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=${1:-$(mktemp -d /tmp/zipmoe-min-deps.XXXXXX)}
CORE=(numpy numba zstandard lz4 huggingface-hub typer rich)
TESTS=(tests/test_startup.py tests/test_container.py tests/test_golden.py tests/test_records.py)

# "name>=X" in the dependencies of pyproject.toml -> "name==X"
pins=()
for name in "${CORE[@]}"; do
    low=$(sed -n "s/^ *\"$name>=\([0-9][^\"]*\)\".*/\1/p" "$ROOT/pyproject.toml" | head -1)
    [[ -n $low ]] || { echo "no lower bound for $name in pyproject.toml" >&2; exit 1; }
    pins+=("$name==$low")
done

echo "== $VENV: ${pins[*]}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${pins[@]}" "pytest>=8" "hypothesis>=6.100"
"$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -m pip list --format=freeze | grep -iE "^($(IFS='|'; echo "${CORE[*]}")|llvmlite|click)=="

cd "$ROOT"
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "torch is importable in $VENV; this check is meant to run without it" >&2
    exit 1
fi
started=$(date +%s)
NUMBA_CACHE_DIR="$VENV/numba-cache" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
echo "== core tests passed on the lowest declared versions in $(($(date +%s) - started)) s"
