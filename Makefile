# Two commands do all the set-up on a fresh machine:  `make run`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-all lint bench gpu-bundle gpu-check-dry

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU venv pins torch 2.14.1 / torchvision 0.29.1; the package itself allows torch>=2.4.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## run the default experiment end to end (extra Hydra overrides: make run ARGS="finetune.num_ingredients=6")
run: $(STAMP)
	$(VENV)/bin/soupbench $(ARGS)

## the test suite (fast tests; `make test-all` adds the slow ones)
test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

test-all: $(STAMP)
	$(VENV)/bin/pytest -q -m "" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check soupbench tests experiments

bench: $(STAMP)
	$(PY) experiments/bench_soups.py $(ARGS)

## copy the GPU machine's wheels and PACS into .gpu-bundle/ (git-ignored; the device tool's carry):
## make gpu-bundle WHEELS=/path/to/wheels PACS=/path/to/pacs
gpu-bundle:
	test -n "$(WHEELS)" -a -n "$(PACS)" || { echo "usage: make gpu-bundle WHEELS=<wheels dir> PACS=<pacs dir>"; exit 2; }
	python3 experiments/gpu_check.py --bundle $(WHEELS) $(PACS)

## the GPU check end to end on the CPU, every size shrunk (PACS from $$SOUPBENCH_PACS or .gpu-bundle/pacs)
gpu-check-dry: $(STAMP)
	$(PY) experiments/gpu_check.py --cpu-dry-run $(ARGS)
