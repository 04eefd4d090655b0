# One-command set-up: every target builds .venv from the pinned files first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: requirements.txt requirements-dev.txt constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt -c constraints.txt
	touch $@

.PHONY: venv test demo
venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python launch.py sweep --config experiments/degradation.py --workdir runs/degradation
	$(BIN)/python launch.py report --workdir runs/degradation
