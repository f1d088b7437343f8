PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

# Idempotent: re-installs only when pyproject.toml changes.
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: on this machine 2.13.0 resolves to the local CPU wheel,
	# while an open range would pull the newest CUDA build (several GB).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/python -m mtjax.demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m mtjax.bench

clean:
	rm -rf $(VENV) demo_out runs
