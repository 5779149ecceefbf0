# Two commands do all the set-up on a fresh machine:
#   make reproduce    # whole reproduction on the default CPU profile (PROFILE=smoke|cpu|paper)
#   make test         # the test suite, notebooks included
# Both create .venv, install qg with its dev extras and fetch Fashion-MNIST when missing; both are idempotent.

VENV      ?= .venv
PY        := $(VENV)/bin/python
PROFILE   ?= cpu
# The torch build these machines carry on disk; override on a GPU box, e.g. TORCH="torch torchvision".
TORCH     ?= torch==2.14.1 torchvision==0.29.1
FMNIST    ?= /usr/share/datasets/fashion-mnist

.PHONY: install data test reproduce checks lab bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
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

# Unit tests, then every notebook on the smoke profile under nbval (pyproject's pytest options).
test: install data
	TQDM_DISABLE=1 $(PY) -m pytest

# Every notebook in order with papermill: tables in results/$(PROFILE)/, figures in figures/$(PROFILE)/.
reproduce: install data
	TQDM_DISABLE=1 $(PY) -m qg.pipeline --profile $(PROFILE)

# After changing what a checked notebook cell prints: rerun smoke and store the outputs nbval compares.
checks: install data
	TQDM_DISABLE=1 $(PY) -m qg.pipeline --profile smoke --store-checks

lab: install data
	$(PY) -m jupyter lab notebooks/

bench: install
	$(PY) -m qg.bench

clean:
	rm -rf artifacts .pytest_cache
