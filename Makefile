# The two commands a new user runs: `make demo` and `make test`. Both install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test faults lint bench down status deps system-packages clean

deps: system-packages $(STAMP)

# Debian packages the local platform and its tests need (MariaDB server; PostgreSQL for Dagster storage as in
# production; Chromium for the UI test). Only installs what is missing.
system-packages:
	@command -v mariadbd >/dev/null 2>&1 || { \
	  echo "installing mariadb-server (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
	  echo "installing postgresql (apt; Dagster instance storage in the production-configuration test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver (apt; the UI test drives a real browser)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 required"' 
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[local,dev]'
	@touch $(STAMP)

# Bring up the whole local platform and show it working.
demo: deps
	$(BIN)/cdc mappings validate
	$(BIN)/cdc stack up
	$(BIN)/cdc capture start
	$(BIN)/cdc workload --rate 200 --duration 10
	@sleep 5
	$(BIN)/cdc stack status
	@echo
	@echo "Capture (binlog -> DMS-layout Parquet in the landing bucket):"
	$(BIN)/cdc capture status
	$(BIN)/cdc dagster start
	@echo "Waiting for the SQS sensor's first loads into BigQuery:"
	$(BIN)/cdc bigquery ls --wait 90 | tail -12
	@sleep 20
	@echo
	@echo "Every table's checks - row counts, contents value for value, landed files (cdc checks):"
	$(BIN)/cdc checks 2>&1 | grep -v ' - dagster - DEBUG - ' | tail -8
	@echo
	@echo "Table status (cdc status; --json for the report):"
	$(BIN)/cdc status
	@echo
	@echo 'The local platform is up. Its configuration (load it with: eval "$$($(BIN)/cdc stack env)"):'
	@$(BIN)/cdc stack env --redact
	@echo
	@echo "Open the Dagster UI at http://127.0.0.1:3000 : Assets shows mysql -> s3_landing -> bigquery per cluster;"
	@echo "each bigquery asset's partitions and materializations (files, rows by op, latency) fill as the sensor runs."
	@echo "Capture and Dagster keep running in the background (logs under .state/capture and .state/dagster)."
	@echo "Stop everything with: $(BIN)/cdc stack down"

# Run the test suite; the tests start (and stop) the servers they need on free ports. Two pytest workers, each with
# its own servers and state folder: most of a case's time is waiting for the platform, which two at once overlap.
TEST_WORKERS ?= 2
test: deps
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# Faults injected into the live platform under load; prints the fault table, writes bench/results/faults.json.
faults: deps
	CDC_FAULTS_JSON=bench/results/faults.json $(BIN)/pytest -m faults -p no:cacheprovider $(PYTEST_ARGS)

# Benchmarks (not timed tests): the whole pipeline at 1x, 10x and a burst of the seed's rate beside its peers; a table
# on stdout, JSON and a latency plot under bench/results/. (python -m bench.capture_bench: the capture alone.)
bench: deps
	$(BIN)/python -m bench.pipeline_bench $(BENCH_ARGS)

# ruff, mypy, and the dependency rules: each stage imports only the stages before it (pyproject.toml, importlinter)
lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

status: deps
	$(BIN)/cdc stack status

down:
	@test -x $(BIN)/cdc && $(BIN)/cdc stack down || true

clean: down
	rm -rf .state $(VENV)
