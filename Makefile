# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The suite spends much of its time waiting on servers and child processes: four workers on two cores (8 min for the suite, against 10.5 with two).
TEST_WORKERS ?= 4

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/floe demo

test: $(STAMP)
	./scripts/test-deps.sh
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy src
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_import_graph.py

clean:
	rm -rf $(VENV) .floe demo.duckdb .pytest_cache

# Benchmark-only environment (dlt for comparisons); never a floe dependency.
bench-deps:
	test -x .venv-bench/bin/python || python3 -m venv .venv-bench
	.venv-bench/bin/pip install -q "dlt[duckdb]"

bench-twilio: $(STAMP) bench-deps
	$(BIN)/python bench/twilio_bench.py

bench-pendo: $(STAMP)
	$(BIN)/python bench/pendo_bench.py

bench-postgres: $(STAMP)
	./scripts/test-deps.sh
	$(BIN)/python bench/postgres_bench.py
	$(BIN)/python bench/postgres_bench.py --disposition merge
