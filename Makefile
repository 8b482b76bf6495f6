# Two entry points for a new machine: `make demo` and `make test`. Both do all set-up:
# a virtual environment with every Python package, and the Kafka jars fetched with mvn.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
JARS := .local/kafka/libs/.complete
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint clean

setup: $(INSTALLED) $(JARS)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[gpu,test,bench]"
	touch $@

$(JARS): infra/kafka/pom.xml | $(INSTALLED)
	$(PY) -m infra.kafka_broker fetch

demo: setup
	$(VENV)/bin/slotforge demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not chaos" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy schemas streams gpu_inference consumers infra bench

clean:
	rm -rf .local
