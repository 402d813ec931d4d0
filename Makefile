# Passerelle — on a fresh machine, `make run` and `make test` do everything.
#
#   make run     virtualenv + dependencies, init-db, 200 demo patients (once), a demo
#                custodian client (once, instance/demo-client.json), then gunicorn on
#                http://127.0.0.1:8000 in the foreground
#   make test    ruff, then the whole pytest suite (PostgreSQL variants run when
#                PASSERELLE_TEST_DATABASE_URL names a server)
#   make bench   the benchmarks
#   make lint    ruff only
#   make clean   removes the virtualenv and caches; instance/ (database, master key,
#                demo credentials) is data and is never removed by make
#
# Python 3.11 (PYTHON=python3.11 make … to choose the interpreter).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers; PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2

.PHONY: all .venv venv run test lint bench clean

all: test

.venv venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever requirements.txt changes.
$(STAMP): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

run: $(STAMP)
	./deploy/run.sh

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
