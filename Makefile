# The two commands a newcomer needs are `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint unit integration bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The main job: an environment with a package, a command in it, then gone.
demo: $(VENV)/.installed
	$(BIN)/gestvenv ephemeral create demo --packages 'six>=1.0' --ttl 300
	$(BIN)/gestvenv run --env demo -- python -c 'import six, sys; print("six", six.__version__, "in", sys.prefix)'
	$(BIN)/gestvenv ephemeral list
	$(BIN)/gestvenv ephemeral cleanup demo

lint: $(VENV)/.installed
	$(BIN)/ruff check gestvenv tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_create.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
