# Everyday targets. `make demo` and `make test` work on a fresh machine: they use the active
# virtual environment, or create and use the project's own `.venv`, install the package once,
# and reinstall (rebuilding the CUDA extension) only when its build files or sources change.
PYTHON ?= python3

ifdef VIRTUAL_ENV
ENV := $(VIRTUAL_ENV)
else
ENV := .venv
endif
PY := $(ENV)/bin/python
STAMP := $(ENV)/.fgpo-installed

# torch: an installed one is kept. Otherwise the tested release: on a machine with an NVIDIA
# GPU PyPI's CUDA build, elsewhere the CPU build from PyTorch's CPU index (not the CUDA build
# of several GB; where that index cannot be reached, pip's configured sources, then PyPI).
# triton: the tested release (the Triton tests run in its CPU interpreter).
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.7.1
# More pins for `pip install -e .[dev]` (test-oldest sets them).
PINS ?=
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_GPU),yes)
TORCH_INDEX ?=
else
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/*.py csrc/*.cu csrc/*.cuh csrc/*.h csrc/*.cpp)

.PHONY: install test test-oldest demo example lint format bench-quick gpu-wheels clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(ENV)

$(STAMP): $(PY) $(BUILD_INPUTS)
	@$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install -q --retries 1 --timeout 15 torch==$(TORCH_VERSION) \
			$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) || \
		$(PY) -m pip install -q torch==$(TORCH_VERSION)
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==$(TRITON_VERSION)
	$(PY) -m pip install -q -e ".[dev]" $(PINS)
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q -ra

# The whole suite on the oldest releases the package accepts, the GPU machine's (torch 2.11,
# triton 3.6, transformers 5.17), without torchvision, in an environment of its own (the Triton
# tests run in triton 3.6's interpreter, patched by the tests: tests/triton_interp_patch.py).
test-oldest:
	$(MAKE) test VIRTUAL_ENV=$(CURDIR)/.venv-oldest TORCH_VERSION=2.11.0 TRITON_VERSION=3.6.0 \
		PINS="torch==2.11.0 triton==3.6.0 transformers==5.17.0"

demo: $(STAMP)
	$(ENV)/bin/fgpo demo --out demo_out --publish docs/demo --readme README.md

example: $(STAMP)
	$(ENV)/bin/fgpo example

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick --device cpu --out benchmarks/results/cpu

# The peers benchmarks/gpu_session.sh times, as wheels for the GPU machine's Python 3.12 (it has
# no network): run where pip has one, then name benchmarks/wheels in the device tool's `carry`.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		-d benchmarks/wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1

clean:
	rm -rf build *.egg-info .pytest_cache
