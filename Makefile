# The two commands of the README. Both create .venv from requirements.txt when it is missing or stale.
PYTHON ?= python3
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

.PHONY: help demo test test-slow gpu-check gpu-data
help:
	@echo "make demo | test | test-slow   (build .venv from requirements.txt when needed)"
	@echo "make gpu-data | gpu-check      (GPU node: its own python3, no .venv; see docs/gpu-check.md)"

demo: $(VENV)/.installed
	$(PY) main.py --config configs/quickstart.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# On a GPU node: the machine's own python3 (no .venv, no pip); the report goes to $OUT when set (the device
# tool's output folder), else benchmarks/gpu_check/. Extra flags: make gpu-check ARGS="--budget 420".
gpu-check:
	python3 benchmarks/gpu_check.py --out "$${OUT:-benchmarks/gpu_check}" $(ARGS)

# Before a GPU session, beside ../shared: the CIFAR-10 subset into the ignored .data/, and a copy of pytest
# (pure Python) into the ignored .gl/ for a GPU machine without it; carry both.
gpu-data: $(VENV)/.installed
	@test -d ../shared/data/cifar10-subset || { echo "error: make gpu-data copies ../shared/data/cifar10-subset, which is not beside this clone; copy your data into .data/ yourself and pass --set data=.data/<folder>" >&2; exit 2; }
	mkdir -p .data .gl && cp -r ../shared/data/cifar10-subset .data/
	cd $(VENV)/lib/python3*/site-packages && cp -r pytest _pytest pluggy iniconfig packaging pygments \
		py.py $(CURDIR)/.gl/ 2>/dev/null || true
