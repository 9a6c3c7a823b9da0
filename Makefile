# The two commands of the README. Both create .venv from requirements.txt when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

.PHONY: demo test test-slow gpu-check gpu-data
demo: $(VENV)/.installed
	$(PY) main.py --config configs/quickstart.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# On a GPU node: the machine's own python3 (no .venv, no pip); see README "GPU check".
gpu-check:
	python3 benchmarks/gpu_check.py

# The CIFAR-10 subset for the check's real-data part, copied into the ignored .data/ (carry it to the GPU machine).
gpu-data:
	mkdir -p .data && cp -r ../shared/data/cifar10-subset .data/
