# Kiln developer entry points. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PJRT_DEVICE := CPU

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[pipeline,loader,examples,ray,dev]'
	touch $(STAMP)

demo: setup
	bash workflows/examples/demo.sh

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/store.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
