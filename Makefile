# imagegen: `make run` serves, `make test` tests; both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run worker test lint bench clean

# Re-installs only when a requirements file changed since the last install.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python app.py

# A cluster worker (QUEUE_BACKEND=celery and the cluster settings; see docs/scaling.md).
worker: install
	$(BIN)/python -m imagegen.worker

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# About 13 minutes on 2 CPU cores; results land in bench/results/*.json. bench.scale needs the
# RabbitMQ and PostgreSQL of docs/scaling.md.
bench: install
	$(BIN)/python -m bench.suite
	$(BIN)/python -m bench.batching
	$(BIN)/python -m bench.request_path
	$(BIN)/python -m bench.scale
