# The README's two commands on a fresh machine: `make tiny` (the main job) and `make test`.
# Both set up .venv first if it is missing (the pinned steps below), then reuse it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU torch from the pin (an unpinned `torch` pulls a multi-GB CUDA build); fairseq is then
# built against it (--no-build-isolation).  Use your own torch build for GPUs.
TORCH := torch==2.13.0
INSTALLED := $(VENV)/.installed
TINY_OUT ?= runs/tiny
# More fairseq-asam-table4 flags for `make tiny`, e.g. TINY_FLAGS="--seeds 1,2".
TINY_FLAGS ?=

.PHONY: venv tiny test test-fast lint format

venv: $(INSTALLED)

$(INSTALLED): setup.py fairseq_asam_experiments/__init__.py  # setup.py reads its COMMANDS
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH) "numpy<2.3" cython setuptools wheel
	$(BIN)/pip install --no-build-isolation -e ".[fairseq,experiments,dev]"
	touch $(INSTALLED)

# Table 4's pipeline with the tiny preset (generated data, CPU); prints the report.
tiny: $(INSTALLED)
	$(BIN)/fairseq-asam-table4 --preset tiny --out $(TINY_OUT) $(TINY_FLAGS)

# The full suite: the CI gate.  A pytest worker per core (pytest-xdist; tests/conftest.py says
# which tests share a worker).
test: $(INSTALLED)
	$(BIN)/python -m pytest -q -n auto

# Everything but the end-to-end runs, for development.
test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -q -n auto -m "not slow"

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff check --fix --select I .
	$(BIN)/ruff format .
