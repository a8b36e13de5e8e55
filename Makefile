# The README's commands: `make demo` (the main job), `make test` and `make gpu-check`. They create .venv when it is missing:
# CPU torch 2.13.0 first (pip takes it from local disk where it lies there), then the project with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := train,kernels,export,runtime,scan,serve,distributed,dev
OUT ?= runs/demo

.PHONY: demo test lint venv clean gpu-check

venv: $(STAMP)

# tensorrt-stubs: TensorRT's published API, for the static check of export/tensorrt_engine.py. --no-deps: the stubs
# require the tensorrt wheel itself, which downloads from NVIDIA's index (not reachable here).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attrimeter demo --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q tests

# The GPU proof kit (README, "GPU check"): downloads the wheels the lent GPU machine lacks and builds the project
# wheel into .whl (what the device tool carries), then rehearses without a GPU, or runs everything on one.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --prepare

clean:
	rm -rf $(VENV) build *.egg-info
