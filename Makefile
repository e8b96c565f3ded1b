# Two commands on a fresh machine (Python 3.10+):  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. Override TORCH_SPEC (e.g. TORCH_SPEC="torch>=2.3") on a machine
# with a GPU; here a local wheel of torch 2.13.0 (CPU) is found by pip.
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints/cpu.txt

.PHONY: venv demo test lint format clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/exactlr demo --out results/demo

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) results .pytest_cache
