# Two entry points for a fresh, offline machine; each sets up .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup clean

$(BIN)/layerwise: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(BIN)/layerwise

# The optional [export], [tensorboard] and [timm] dependencies, which the tests use (the demo does not need them).
$(VENV)/.export: requirements-export.txt $(BIN)/layerwise
	$(BIN)/pip install -q -r requirements-export.txt
	touch $@

# Greedy layerwise training of the demo preset on the built-in CIFAR-10 sample (CPU, about 2 minutes).
demo: setup
	$(BIN)/layerwise train

test: setup $(VENV)/.export
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
