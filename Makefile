# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $(STAMP)

# Train a DDPM on scikit-learn's bundled digits, sample, evaluate and log (offline wandb without a key).
# Each run starts runs/demo afresh.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/ld-train experiment=digits_ddpm run_dir=runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check lightning_diff tests
	$(BIN)/ruff format --check lightning_diff tests

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
