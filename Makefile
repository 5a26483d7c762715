# `make run` and `make test` are the two commands a user needs; each builds
# .venv on first use and reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_PROCESSES ?= $(shell $(PYTHON) -c 'import os; print(min(4, len(os.sched_getaffinity(0)) + 1))')

.PHONY: run test lint bench bench-quick soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/billing-ingestor serve $(ARGS)

# The tests run in one process more than there are cores (pytest-xdist),
# at most four: each opens PostgreSQL connections and starts servers of its
# own. Much of their time is CPU (the servers they start, the load they
# send), but much is waiting (leases, timers, frozen processes): on two
# cores, three processes took 472 s where two took 616, and left the cores
# 15% idle. Each test has its own database, ports and data dir.
# TEST_PROCESSES=2 sets the count; PYTEST_ARGS="-n 0" runs them in one
# process. The 30 slowest are listed at the end: the suite is to stay under
# 10 minutes on two cores.
test: $(STAMP)
	$(BIN)/ruff check ingestor tests bench
	$(BIN)/ruff format --check ingestor tests bench
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_PROCESSES) --dist worksteal --durations=30 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check ingestor tests bench
	$(BIN)/ruff format --check ingestor tests bench
	$(BIN)/mypy

# The load benchmark (bench/README.md). matplotlib draws the chart; it is the
# `bench` extra, installed here on first use. BENCH_ARGS passes options on,
# e.g. make bench BENCH_ARGS="--workers 2 --only array1000".
bench: $(STAMP)
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q matplotlib
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q matplotlib
	$(BIN)/python bench/run.py --quick $(BENCH_ARGS)

# A steady load at 70% of the capacity it measures first, for 10 minutes by
# default; writes bench/results/soak-<time>.{json,md} (throughput, latency
# percentiles, server RSS over time). SOAK_ARGS passes options on, e.g.
# make soak SOAK_ARGS="--minutes 60" or SOAK_ARGS="--rate 150".
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
