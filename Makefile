# Two commands for a fresh machine; each creates its own environment (.venv) first.
#   make demo   - the tiny profile on the bundled sample (CPU, < 2 minutes once installed)
#   make test   - the layer contract (lint-imports) and the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.digi2real-installed

.PHONY: demo test lint clean

$(STAMP): requirements.lock pyproject.toml scripts/setup_env.sh
	scripts/setup_env.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/digi2real demo --out digi2real-demo

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n auto --maxprocesses 4

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) digi2real-demo
