# One command per job. `make serve` and `make test` are the README's two commands.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: install examples serve test lint typecheck unit clean images-check mutation

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The core, every backend and the dev tools, pinned by constraints.txt (torch==2.13.0, CPU).
install: $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -r requirements-dev.txt

examples: install
	$(BIN)/python examples/make_models.py --out examples/models

# The examples include a Python predictor, which runs code from the repository: allowed here,
# since this repository generated them.
serve: examples
	$(BIN)/multiserve serve --models examples/models --port $(PORT) --allow-python-predictors

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

# Mutation testing of the pure policy modules against their fast unit tests ([tool.mutmut] in
# pyproject.toml; a few minutes on 2 cores). Prints killed / survived per module.
mutation: install
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/python tools/mutation_report.py

# Builds the images in deploy/image/ with podman and runs them (slow, so not part of `make test`;
# CI runs it). Needs root, podman, runc and debootstrap: `bash .ci/system-deps`.
images-check: install
	MULTISERVE_IMAGES=1 $(BIN)/pytest tests/images -v -s -p no:cacheprovider

clean:
	rm -rf $(VENV) examples/models .pytest_cache .mypy_cache .ruff_cache mutants
