# `make run` and `make test` each create or reuse .venv, install, prepare MNIST and do their job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA ?= data

.PHONY: install data run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The constraints pin torch 2.14.1 / torchvision 0.29.1: that pair installs from local disk here.
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(BIN)/python -m loralab.mnist $(DATA)

run: data
	$(BIN)/python train.py stage=pretrain
	$(BIN)/python train.py stage=finetune lora.rank=1,2,4 -m
	$(BIN)/python scripts/report.py $$(ls -d outputs/finetune-sweep/*/ | tail -n 1)

test: data
	$(BIN)/ruff check src tests benchmarks scripts train.py
	LORALAB_DATA_DIR=$(abspath $(DATA)) $(BIN)/python -m pytest

bench: data
	$(BIN)/python benchmarks/bench.py --data-dir $(DATA) --out docs/bench.json

clean:
	rm -rf outputs/*/ multirun .pytest_cache
