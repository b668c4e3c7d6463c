# One-command entry points. `make run` and `make test` work on a fresh clone: each creates
# the virtual environment first if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run tui test coverage mutate bench sample clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Prune, fine-tune and evaluate the bundled sample model headless; outputs in the next free
## runs/sample-N folder.
run: $(STAMP)
	$(BIN)/gkp-workbench --batch

## Open the interactive workbench on the bundled sample model.
tui: $(STAMP)
	$(BIN)/gkp-workbench

test: $(STAMP)
	$(BIN)/python -m pytest -q

## Line coverage of the whole suite (pytest-cov), per module, missing lines listed.
coverage: $(STAMP)
	$(BIN)/python -m pytest -q --cov=engine --cov=widgets --cov=workbench --cov-report=term-missing:skip-covered

## Mutation testing of the algorithm core (mutmut; slow, not in CI). One module at a time:
## `make mutate MODULE=smoothness` (grouping, tmi, selection, search, reconstruct); no MODULE: all.
## PYTHONPATH is cleared so the tests import the mutated copy under mutants/, not this tree.
MODULE ?=
mutate: $(STAMP)
	env -u PYTHONPATH $(BIN)/mutmut run --max-children 2 $(if $(MODULE),"engine.gkp.$(MODULE).*")
	env -u PYTHONPATH $(BIN)/mutmut results

bench: $(STAMP)
	$(BIN)/python -m bench

## Retrain the bundled sample model and its snapshots (deterministic, a few minutes on 2 cores).
sample: $(STAMP)
	$(BIN)/python -m sample_models.train_sample

clean:
	rm -rf $(VENV) runs .pytest_cache mutants .hypothesis .coverage
