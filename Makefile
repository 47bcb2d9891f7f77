# aenode: the two README commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED ?= ../shared
DEMO_STUDY ?= $(SHARED)/data/udacity-mr/Study1
export PYTHONUNBUFFERED := 1

.PHONY: install system-deps demo demo-stop test lint bench stress train clean

## install: Debian packages (dcmtk, orthanc, dicom3tools) when missing, then the virtualenv.
install: system-deps $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned: the pin takes the local CPU build; an unpinned torch pulls CUDA.
	$(PY) -m pip install -q "torch==2.13.0"
	# [ray]: the Ray executor and its tests (tests/test_ray_executor.py) run in CI too.
	$(PY) -m pip install -q -e ".[dev,ray]"
	@touch $(STAMP)

## demo: Orthanc as the PACS, aenode with config.yaml, a real study sent, the results shown.
demo: install
	$(PY) scripts/demo.py --study "$(DEMO_STUDY)"

demo-stop:
	$(PY) scripts/demo.py --stop

## test: ruff, mypy, pytest (what CI runs).
test: install lint
	$(VENV)/bin/pytest -q

lint:
	$(VENV)/bin/ruff check aenode tests scripts bench stress models
	$(VENV)/bin/ruff format --check aenode tests scripts bench stress models
	$(VENV)/bin/mypy

## stress: the long attack suite (fuzz 10,000, PDU abuse, 16x3 senders, kill -9 at each stage).
stress: install
	$(PY) stress/run.py $(STRESS_ARGS)

## bench: throughput and latency against reference runs in the same command.
bench: install
	$(PY) -m bench

## train: retrain the shipped hippocampus model (CPU, about 25 minutes on 2 cores).
train: install
	$(VENV)/bin/aenode train hippocampus --data $(SHARED)/data/msd-hippocampus --out models/hippocampus

clean:
	rm -rf var demo-out bench-out .mypy_cache .ruff_cache .pytest_cache
