# Every target sets itself up: the virtualenv, the packages, and the services it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run demo test test-real lint lock infra-down clean

# The exact versions in requirements-dev.lock (`make lock` resolves them from pyproject.toml), so
# every machine and CI install the same packages; the project itself on top, without resolving.
$(STAMP): pyproject.toml requirements-dev.lock
	@test -x $(BIN)/python || { echo "Setting up: a virtualenv in $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "Setting up: $$(grep -c '==' requirements-dev.lock) pinned packages into $(VENV) (a few minutes the first time)"
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	@echo "Setting up: done"
	@touch $(STAMP)

## make lock: resolve requirements.lock (the image's) and requirements-dev.lock again.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 --no-header -q -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --no-header -q -o requirements-dev.lock

## make run: the whole system on SQLite and the embedded broker; prints where it is.
run: $(STAMP)
	$(BIN)/trial run

## make demo: a whole trial (57 patients, 52 weeks) on an accelerated clock, against a system of
## its own (`trial run --clock-file` in a temporary folder); exit 0 when every figure matched.
demo: $(STAMP)
	$(BIN)/trial demo

## make test: the whole suite on the embedded default (SQLite + the embedded Kafka-protocol broker).
test: $(STAMP)
	TRIAL_TEST_BACKEND=embedded $(BIN)/python -m pytest $(PYTEST_ARGS)

## make test-real: the same suite on PostgreSQL and Apache Kafka, both installed and started here.
test-real: $(STAMP)
	$(BIN)/python deploy/infra.py postgres up
	@# Fetch Kafka's jars up front (cached), so a download failure reads as one; the tests start
	@# their own brokers on free ports.
	$(BIN)/python -c "from deploy import infra; print('kafka', *infra.kafka_libs())"
	TRIAL_TEST_BACKEND=real $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy shared services tooling deploy tests bench

## Stop whatever the test targets left running (they are reused between runs otherwise).
infra-down:
	-$(BIN)/python deploy/infra.py kafka down
	-$(BIN)/python deploy/infra.py postgres down
	-$(BIN)/python deploy/infra.py tansu down

clean: infra-down
	rm -rf .run $(VENV)
