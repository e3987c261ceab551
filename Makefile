# The two README commands: `make demo` and `make test`. Everything they need is installed here.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test soak bulk bench lint clean chromium lab

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# `make demo NOTEBOOK=render` runs notebooks/render.ipynb instead of the quickstart.
NOTEBOOK ?= quickstart
demo: $(STAMP)
	$(BIN)/python notebooks/demo.py $(NOTEBOOK)

# The browser test drives Debian's Chromium; install it where missing (skipped, with the
# reason printed, where that is impossible).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium could not be installed: the browser test will be skipped"

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q --durations=20 tests -m "not soak and not bulk"

# The acceptance runs at full scale (100,000-task map and Dask graph, a gateway away for 90 s):
# minutes each, so outside `make test`; `make bench` and CI run them too.
soak: $(STAMP)
	$(BIN)/python -m pytest -q tests -m soak

# JupyterLab from this .venv, on notebooks/: where your own notebooks start. LAB_ARGS passes flags.
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# Gigabyte transfers through the gateway (cut-through memory bounds): minutes, gigabytes of RAM.
bulk: $(STAMP)
	$(BIN)/python -m pytest -q tests -m bulk

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/scale.py --out benchmarks/results/scale.json
	$(MAKE) soak
	$(MAKE) bulk

lint: $(STAMP)
	$(BIN)/ruff check gateway provider notebook_ext tests benchmarks notebooks

clean:
	rm -rf $(VENV) build *.egg-info
