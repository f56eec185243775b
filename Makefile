# The two commands of the README: `make serve` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# torch first, pinned: that takes the local CPU build; letting `.[local]` resolve it would pull CUDA wheels.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,local,postgres]'
	touch $(STAMP)

.PHONY: serve test bench
serve: $(STAMP)
	$(VENV)/bin/imagegate serve

test: $(STAMP)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/gateway_overhead.py
	$(PY) bench/failover_load.py
	$(PY) bench/local_pipeline.py
	$(PY) bench/billing_throughput.py
