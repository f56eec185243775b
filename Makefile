# The two commands of the README: `make serve` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.core-installed
FULL := $(VENV)/.all-installed

# Serving needs only the core: no torch, diffusers or transformers (the [local] extra adds them).
$(CORE): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(CORE)

# Everything the tests need. torch first, pinned: that takes the local CPU build; letting `.[local]`
# resolve it would pull CUDA wheels.
$(FULL): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,local,postgres]'
	touch $(FULL) $(CORE)

# The browser tests drive Debian's Chromium (playwright cannot download its own here).
BROWSER := /usr/bin/chromium
$(BROWSER):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

.PHONY: serve test lint bench
serve: $(CORE)
	$(VENV)/bin/imagegate serve

# The gate (lint, types, architecture), then the suite.
lint: $(FULL)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint $(BROWSER)
	$(VENV)/bin/pytest -q

bench: $(FULL)
	$(PY) bench/gateway_overhead.py
	$(PY) bench/failover_load.py
	$(PY) bench/local_pipeline.py
	$(PY) bench/billing_throughput.py
	$(PY) bench/a1111_surface.py
	$(PY) bench/artifact_storage.py
