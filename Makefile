# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse .venv and install the project into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the tested build (CPU here; the CUDA build on GPU hosts).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/binserve demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

proto: $(STAMP)
	$(PY) -m proto.binserve.v1.codegen

clean:
	rm -rf $(VENV) .models .pytest_cache .ruff_cache
