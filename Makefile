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

## Line coverage of the whole suite (pytest-cov), per module, missing lines listed. The two
## tests that interrupt a child process while it imports are left out: under coverage the
## child's import-time lines they wait for never match, so the child runs to the end.
coverage: $(STAMP)
	$(BIN)/python -m pytest -q --cov=engine --cov=widgets --cov=workbench --cov-report=term-missing:skip-covered \
		--deselect "tests/workbench/test_fuzz_batch.py::test_interrupt_while_importing_exits_130"

## Mutation testing of the algorithm core (mutmut; slow, not in CI), one module at a time:
## `make mutate MODULE=smoothness` (or grouping, tmi, selection, search, reconstruct).
## PYTHONPATH is cleared so the tests import the mutated copy under mutants/, not this tree.
## Each module's mutants run against that module's own tests (GKP_MUTATE_TESTS, read by
## tests/conftest.py); the coverage stats are redone whenever the module changes.
MODULE ?= smoothness
PROPS := tests/gkp/test_properties.py
TESTS_smoothness := tests/gkp/test_smoothness.py $(PROPS)
TESTS_grouping := tests/gkp/test_grouping.py $(PROPS)
TESTS_tmi := tests/gkp/test_tmi.py
TESTS_selection := tests/gkp/test_selection.py tests/gkp/test_selection_contract.py tests/gkp/test_traces.py $(PROPS)
TESTS_search := tests/gkp/test_selection.py tests/gkp/test_selection_contract.py tests/gkp/test_search.py
TESTS_reconstruct := tests/gkp/test_reconstruct.py tests/gkp/test_reconstruct_plans.py $(PROPS)
mutate: $(STAMP)
	rm -f mutants/mutmut-stats.json
	env -u PYTHONPATH GKP_MUTATE_TESTS="$(TESTS_$(MODULE))" $(BIN)/mutmut run --max-children 2 "engine.gkp.$(MODULE).*"
	env -u PYTHONPATH $(BIN)/mutmut results --all true | grep "engine.gkp.$(MODULE)\." | sed 's/.*: //' | sort | uniq -c

bench: $(STAMP)
	$(BIN)/python -m bench

## Retrain the bundled sample model and its snapshots (deterministic, a few minutes on 2 cores).
sample: $(STAMP)
	$(BIN)/python -m sample_models.train_sample

clean:
	rm -rf $(VENV) runs .pytest_cache mutants .hypothesis .coverage
