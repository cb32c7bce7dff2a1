# make run   : install, then train the embedded default (local Ray, built-in grid25, local MLflow)
# make test  : install with test tools, then run the whole test suite (what CI runs)
# make test-fast : unit tests only (seconds)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-dev run test test-fast lint clean

setup:
	bash docker/install.sh $(VENV)

setup-dev:
	STABLEGAN_DEV=1 bash docker/install.sh $(VENV)

run: setup
	$(PY) -m trainer.main $(ARGS)

test: setup-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

test-fast: setup-dev
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf runs mlflow.db mlartifacts outputs multirun
