# Two commands matter: `make demo` and `make test` (see README.md); CI (.ci/run) runs
# `make lint` before `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP_RUN)

## demo: set up, then run the main job (replay real traces against an embedded deployment)
demo: $(STAMP_RUN)
	$(BIN)/patinox demo --report demo-report.json

## test: set up with the dev extras, then run the whole test suite
test: $(STAMP_DEV)
	@$(BIN)/python -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; \
	  exit $$rc

## lint: set up with the dev extras, then ruff, mypy (strict) and the import-linter contracts
lint: $(STAMP_DEV)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

## bench: every bench/*.py but the helpers (_*.py, baseline_app.py) and run_path_cpu.py
## (it compares two source trees: run it by hand with --other), among them
## isolation_overhead.py (each isolation level's cost beside the bare agent:
## bench/results/isolation_overhead.json)
bench: $(STAMP_DEV)
	@mkdir -p bench/results
	@for b in bench/*.py; do case $$b in */_*|*/baseline_app.py|*/run_path_cpu.py) continue;; esac; \
	  echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .patinox demo-report.json .pytest_cache .mypy_cache .ruff_cache
