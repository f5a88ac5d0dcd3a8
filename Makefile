# Everyday targets. `make test` and `make demo` work on a fresh machine (they install first).
PY ?= python3
PIP = $(PY) -m pip

.PHONY: install test demo example lint format bench bench-quick clean

install:
	$(PIP) install -q torch==2.13.0 triton==3.7.1
	$(PIP) install -q -e ".[dev]"

test: install
	$(PY) -m pytest tests -q -ra

demo: install
	fgpo demo --out demo_out

example: install
	fgpo example

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .

bench-quick: install
	$(PY) -m benchmarks.run --quick --device cpu --out benchmarks/results/cpu

clean:
	rm -rf build *.egg-info .pytest_cache
