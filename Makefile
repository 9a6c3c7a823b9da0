# The two commands of the README. Both create .venv from requirements.txt when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

.PHONY: demo test test-slow
demo: $(VENV)/.installed
	$(PY) main.py --config configs/quickstart.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow
