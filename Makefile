# Two commands do all the set-up on a fresh machine:
#   make reproduce    # whole reproduction on the default CPU profile (PROFILE=smoke|cpu|paper)
#   make test         # the test suite, notebooks included
# Both create .venv, install qg with its dev extras and fetch Fashion-MNIST when missing; both are idempotent.

VENV      ?= .venv
PY        := $(VENV)/bin/python
PROFILE   ?= cpu
JOBS      ?= 1
# The torch build these machines carry on disk; override on a GPU box, e.g. TORCH="torch torchvision".
TORCH     ?= torch==2.14.1 torchvision==0.29.1
FMNIST    ?= /usr/share/datasets/fashion-mnist

.PHONY: install data test unit lint reproduce checks lab bench gpu-wheels gpu-check lock clean clean-cache

install: $(VENV)/.installed

# Exact versions from requirements.lock (refresh it with `make lock`), then qg itself without touching them.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (qg)" > /dev/null
	touch $@

# Fashion-MNIST: the QG_DATA folder or the Debian package's files; install the package where we can.
data:
	@if [ -n "$$QG_DATA" ] || [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get > /dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist > /dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist > /dev/null)) && echo "Fashion-MNIST: installed"; \
	else \
		echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist', or set QG_DATA to a folder" \
		     "holding train-images-idx3-ubyte.gz and the other three IDX files."; exit 1; \
	fi

# Lint, unit tests, then every notebook on the smoke profile under nbval (pyproject's pytest options).
test: install data lint
	TQDM_DISABLE=1 $(PY) -m pytest

# The unit tests alone (a few minutes; no notebook runs).
unit: install data
	TQDM_DISABLE=1 $(PY) -m pytest tests

lint: install
	$(PY) -m ruff check qg tests
	$(PY) -m ruff format --check qg tests

# Every notebook in order with papermill: tables in results/$(PROFILE)/, figures in figures/$(PROFILE)/.
# JOBS=2: after 01_collect and 02_train, two notebooks at a time, each kernel on one core.
reproduce: install data
	TQDM_DISABLE=1 $(PY) -m qg.pipeline --profile $(PROFILE) --jobs $(JOBS)

# After changing what a checked notebook cell prints: rerun smoke and store the outputs nbval compares.
checks: install data
	TQDM_DISABLE=1 $(PY) -m qg.pipeline --profile smoke --store-checks

lab: install data
	$(PY) -m jupyter lab notebooks/

bench: install
	$(PY) -m qg.bench

# The one GPU check (qg/bench/gpu.py): Mamba-2 against mamba-ssm, generator speed by backbone, 50 paper-profile
# steps; results/gpu/gpu_check.{json,md}. A GPU machine without the registries gets its missing packages as wheels
# made here first with `make gpu-wheels` (mamba-ssm's Triton path, built with MAMBA_SKIP_CUDA_BUILD=TRUE, and what
# qg needs beyond a PyTorch image), in .whl/; gpu-check installs them into $(GPU_SITE) and runs with the system python.
GPU_PY    ?= python3
GPU_SITE  ?= /tmp/qg-gpu-site
GPU_WHEELS = pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
MAMBA_SSM ?= mamba-ssm==2.2.4

gpu-wheels: install
	mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PY) -m pip wheel -q --no-deps --no-build-isolation \
		$(MAMBA_SSM) -w .whl

gpu-check:
	@if ls .whl/*.whl > /dev/null 2>&1; then \
		$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl; \
	fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PY) -m qg.bench.gpu --out results/gpu

# Re-resolve pyproject's ranges in a scratch venv and pin what they give (torch stays $(TORCH)).
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q $(TORCH) && .lock-venv/bin/pip install -q -e '.[dev]'
	echo "# Exact versions make install uses; torch, torchvision and their CUDA stack come from TORCH. Refresh: make lock" > requirements.lock
	.lock-venv/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' >> requirements.lock
	rm -rf .lock-venv

# `clean` keeps the cache of checkpoints, generators and quantized files (hours of work); `clean-cache` removes it.
clean:
	rm -rf .pytest_cache build qg.egg-info

clean-cache:
	rm -rf artifacts
