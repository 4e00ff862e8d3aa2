# imagegen: `make run` serves, `make test` tests; both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
RUNTIME := $(VENV)/.runtime-installed
# 1: also requirements-gpu.lock (bitsandbytes), which only a CUDA GPU runs; by default where nvidia-smi answers.
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
DEV := $(VENV)/.dev-installed

.PHONY: install install-dev kernels docs run worker test faults image-test lint bench gpu-wheels screenshot lock audit clean

# Each stamp re-installs only when its lock file changed since the last install.
# The runtime (requirements.lock) is all that `make run` needs; the test and lint tools
# (requirements-dev.lock) come with `make test` and `make lint`. Every package is checked against
# its hashes; torch, whose build differs by platform, comes after by version (tools/lock.py says why).
$(RUNTIME): requirements.lock requirements-gpu.lock constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes --no-deps -r requirements.lock
	if [ "$(GPU)" = 1 ]; then $(PIP) --require-hashes --no-deps -r requirements-gpu.lock; fi
	$(PIP) -c constraints.txt torch
	$(BIN)/python tools/pip_check.py
	touch $@

$(DEV): $(RUNTIME) requirements-dev.lock
	$(PIP) --require-hashes --no-deps -r requirements-dev.lock
	$(BIN)/python tools/pip_check.py
	touch $@

install: $(RUNTIME)

install-dev: $(DEV)

# quanto's CPU int4 kernel (C++; about 40 s on two idle cores, minutes on a busy machine), built
# ahead; without this target the first model that asks for CPU int4 builds it, once per installation.
kernels: install
	$(BIN)/python -m imagegen.quantization

run: install
	$(BIN)/python app.py

# A cluster worker (QUEUE_BACKEND=celery and the cluster settings; see docs/scaling.md).
worker: install
	$(BIN)/python -m imagegen.worker

# Two processes (pytest-xdist), each taking whole files, so a file's module-scoped server starts
# once: most tests wait on servers and workers of their own, and the suite takes 0.78x the time.
test: install-dev
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The reliability promise measured (docs/reliability.md): eleven faults, one at a time, each into a
# deployment of its own on this machine's PostgreSQL and RabbitMQ; about 5 minutes. The disk-full
# row mounts a small tmpfs (root); `make test` runs two quick rows.
faults: install-dev
	$(BIN)/python -m bench.faults

# Builds the container image and runs it alone and as cluster roles (README "Deploying"); needs
# Docker (it starts Debian's dockerd, and makes the base image with debootstrap, when it must).
image-test: install-dev
	$(BIN)/python -m tools.image_test

# The documentation site (MkDocs, Material theme) in site/; the tests build it too, with --strict,
# so a broken link or anchor fails them.
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Redraws docs/playground.png (the tests never write into the tree); needs Debian's chromium.
screenshot: install-dev
	IMAGEGEN_SCREENSHOT=docs/playground.png $(BIN)/python -m pytest -q tests/test_ui.py -k "shows_progress or desktop"

# Re-pins the whole tree (constraints.txt, requirements*.lock with hashes) from a fresh environment
# of requirements-dev.txt; it asks PyPI for the hashes, so it needs the network.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -r requirements-gpu.txt
	.venv-lock/bin/python -m tools.lock && rm -rf .venv-lock

# Known vulnerabilities in every pinned package (pip-audit, in an environment of its own; it asks
# PyPI's vulnerability data, so it needs the network and is not part of `make test`).
audit:
	test -x .venv-audit/bin/pip-audit || { $(PYTHON) -m venv .venv-audit && .venv-audit/bin/python -m pip install --quiet pip-audit; }
	.venv-audit/bin/pip-audit --requirement constraints.txt --no-deps --disable-pip

clean:
	rm -rf $(VENV) .venv-lock .venv-audit .pytest_cache .ruff_cache

# About 30 minutes on 2 CPU cores; results land in bench/results/*.json. bench.scale needs the
# RabbitMQ and PostgreSQL of docs/scaling.md.
bench: install
	$(BIN)/python -m bench.suite
	$(BIN)/python -m bench.batching
	$(BIN)/python -m bench.request_path
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.fullsize
	$(BIN)/python -m bench.edits
	$(BIN)/python -m bench.upscale
	$(BIN)/python -m bench.controlnet
	$(BIN)/python -m bench.loras
	$(BIN)/python -m bench.previews
	$(BIN)/python -m bench.step_cache
	$(BIN)/python -m bench.loads
	$(BIN)/python -m bench.compiling
	$(BIN)/python -m bench.provenance

# The wheels bench/gpu.py needs on a GPU machine that has torch but no network (Python 3.12,
# manylinux x86-64), into .whl/; bench/gpu.py's docstring says how to install and run them there.
GPU_WHEELS := diffusers transformers huggingface-hub flask werkzeug itsdangerous blinker pydantic pydantic-core pydantic-settings python-dotenv \
	annotated-types typing-inspection limits deprecated sqlalchemy greenlet alembic mako torchao bitsandbytes gguf
gpu-wheels:
	mkdir -p .whl && for name in $(GPU_WHEELS); do \
	  version=$$(grep -i "^$$name==" constraints.txt | cut -d= -f3); \
	  $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 \
	    -d .whl "$$name==$$version" || exit 1; \
	done
