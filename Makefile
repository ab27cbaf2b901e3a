# `make run` and `make test` each create or reuse their environment, install, prepare MNIST and do
# their job. Two environments, because every command pays for what is installed: torchmetrics
# imports transformers when it is there (peft, the tests' reference, pulls it in) and scipy.signal
# when scipy is (optuna), about 1.7 s per process that the runtime never uses (docs/benchmarks.md
# section 11).
PYTHON ?= python3
VENV := .venv
DEV_VENV := .venv-dev
DATA ?= data

.PHONY: install data run test bench gpu-check clean

# $(call env,DIR,EXTRAS): a venv in DIR with the project installed editable, with EXTRAS. Built
# afresh whenever pyproject.toml or the constraints change: pip never removes a package the
# project stopped depending on, and every command would go on paying for its import.
define env
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	# The constraints pin torch 2.14.1 / torchvision 0.29.1: that pair installs from local disk here.
	$(1)/bin/python -m pip install -q -c constraints.txt -e '.$(2)'
	touch $(1)/.installed-stamp
endef

$(VENV)/.installed-stamp: pyproject.toml constraints.txt
	$(call env,$(VENV),)

$(DEV_VENV)/.installed-stamp: pyproject.toml constraints.txt
	$(call env,$(DEV_VENV),[dev])

install: $(VENV)/.installed-stamp

MNIST = $(1)/bin/python -m loralab.mnist $(DATA)

data: $(VENV)/.installed-stamp
	$(call MNIST,$(VENV))

run: data
	$(VENV)/bin/python train.py stage=pretrain
	$(VENV)/bin/python train.py stage=finetune lora.rank=1,2,4 -m
	$(VENV)/bin/python scripts/report.py $$(ls -d outputs/finetune-sweep/*/ | tail -n 1)

test: $(DEV_VENV)/.installed-stamp
	$(call MNIST,$(DEV_VENV))
	$(DEV_VENV)/bin/ruff check src tests benchmarks scripts train.py
	LORALAB_DATA_DIR=$(abspath $(DATA)) $(DEV_VENV)/bin/python -m pytest

bench: $(DEV_VENV)/.installed-stamp
	$(call MNIST,$(DEV_VENV))
	$(DEV_VENV)/bin/python benchmarks/bench.py --reps 40 --data-dir $(DATA) --out docs/bench.json

# On a GPU machine with torch, Lightning, torchmetrics, TensorBoard and PEFT installed: no venv,
# the source tree as it is; Hydra and OmegaConf come from WHEELS where missing.
# benchmarks/gpu_check.py says what it runs.
WHEELS ?= .whl
GPU_OUT ?= gpu_check.json
gpu-check:
	PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py --wheels $(WHEELS) --out $(GPU_OUT)

clean:
	rm -rf outputs/*/ multirun .pytest_cache
