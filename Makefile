# Passerelle — on a fresh machine, `make run` and `make test` do everything.
#
#   make run     virtualenv + dependencies, init-db, 200 demo patients (once), a demo
#                custodian client (once, instance/demo-client.json), a demo patient's
#                invitation link to the consent portal (until they choose a passphrase),
#                then gunicorn on http://127.0.0.1:8000 in the foreground
#   make test    ruff, then the whole pytest suite; its PostgreSQL variants run on
#                PASSERELLE_TEST_DATABASE_URL, else on postgresql://postgres@127.0.0.1:5432/test
#                when that answers (one summary line says why they were skipped); the
#                browser tests (tests/browser/) need Debian's chromium at /usr/bin/chromium
#                (skipped without it, except under CI, where .ci/run installs it)
#   make bench   the benchmarks at full scale on SQLite, then PostgreSQL, written to
#                benchmarks/RESULTS.md and benchmarks/utility.png (SQLite alone 35–40 min, and model
#                training 15–30 min more; BENCH_SCALE=small: minutes)
#   make bench-quick  the guarded ratios at a small scale; fails when one is more than
#                3× worse than its target (BENCH_FAIL_FACTOR to change)
#   make lint    ruff only
#   make clean   removes the virtualenv and caches; instance/ (database, master key,
#                demo credentials) is data and is never removed by make
#
# Python 3.11 (PYTHON=python3.11 make … to choose the interpreter).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers; PYTEST_WORKERS=0 runs the suite in one process. A worker that runs out of tests
# takes some of the other's (--dist worksteal): tests last from 0.02 to 16 s, and the whole suite took
# 6 min 02 s instead of 6 min 21 s with xdist's default shares (2 cores, 2026-12-02).
PYTEST_WORKERS ?= 2
# Byte-code is written, even where the environment sets PYTHONDONTWRITEBYTECODE (some machines do, as
# does the Dockerfile, which compiles the code itself): otherwise every `flask --app wsgi` command,
# gunicorn worker and test process compiles a hundred modules as it starts (0.6 s of a CLI command's
# 2.5 s on a slow 2-core machine), and pytest rewrites every test module again (12 s per worker).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: all .venv venv run test lint bench bench-quick clean

all: test

.venv venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever requirements.txt changes; pip shows each package as it goes.
$(STAMP): requirements.txt | $(BIN)/python
	@echo "==> Installing dependencies into $(VENV) (a few minutes on a first run)"
	$(BIN)/python -m pip install --disable-pip-version-check -r requirements.txt
	touch $@

run: $(STAMP)
	./deploy/run.sh

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check .

BENCH_SCALE ?= full
BENCH_FAIL_FACTOR ?= 3

bench: $(STAMP)
	$(BIN)/python -m benchmarks --scale $(BENCH_SCALE) --db sqlite --db postgresql --results benchmarks/RESULTS.md

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick --fail-factor $(BENCH_FAIL_FACTOR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
