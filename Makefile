# zipmoe: `make demo` runs the main job on a built-in offline checkpoint; `make test` runs the test suite.
# Both create .venv first. torch is pinned here (a CPU wheel on the project's machines) while pyproject.toml keeps
# a normal range for users; override with `make TORCH_SPEC=torch install`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := build/demo

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python -m zipmoe._kernels  # compile numba's kernels now, not in the first command
	touch $(STAMP)

demo: install
	$(BIN)/zipmoe demo-checkpoint $(DEMO)/model --force
	$(BIN)/zipmoe pack $(DEMO)/model -o $(DEMO)/model.zmoe --force
	$(BIN)/zipmoe verify $(DEMO)/model.zmoe --source $(DEMO)/model
	$(BIN)/zipmoe inspect $(DEMO)/model.zmoe

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/zipmoe bench codecs
	$(BIN)/zipmoe bench pack
	$(BIN)/zipmoe bench run
	$(BIN)/zipmoe bench serve
	$(BIN)/zipmoe bench slices --plot docs/slices-ppl-vs-tpot.png

clean:
	rm -rf build .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
