# Shortcuts; each target is one documented command (see README.md).
PYTHON ?= python3

.PHONY: test bench bench-smoke

test:
	$(PYTHON) -m pytest

# The whole benchmark (1M rows, ~21 min on 2 cores): benchmarks/results/latest.json, tables on stdout.
bench:
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

# Seconds: tiny tables, one repetition; checks the benchmark code, the numbers mean nothing.
bench-smoke:
	$(PYTHON) -m benchmarks --smoke --out $${TMPDIR:-/tmp}/backfill-bench-smoke.json
