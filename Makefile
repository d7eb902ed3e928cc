# Two commands do everything on a fresh clone (Python 3.10+ with venv and pip):
#   make demo   - set up .venv, then compress on real MNIST and print the result
#   make test   - set up .venv, then lint and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real datasets: ../shared/data beside the checkout when present; otherwise the loaders find or fetch them.
SHARED_DATA := $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export LIT_COMPRESS_DATA ?= $(if $(wildcard $(SHARED_DATA)/mnist),$(SHARED_DATA),)

.PHONY: install demo test lint zoo-verify clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lit-compress fit --config configs/demo-prune-lenet_300_100-mnist.yaml
	$(BIN)/lit-compress zoo list

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q

zoo-verify: $(STAMP)
	$(BIN)/lit-compress zoo verify

clean:
	rm -rf $(VENV) runs build dist .pytest_cache .ruff_cache
