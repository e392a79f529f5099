# Two commands that work on a fresh machine (see README):
#   make demo   set up .venv and run the main job on small default data (CPU when no GPU)
#   make test   set up .venv and run the whole test suite
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.sparsebert-installed
# Pin torch exactly: its CPU wheel lies on disk; a looser pin downloads a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEPS   := triton==3.7.1 numpy pybind11 ninja setuptools wheel transformers safetensors tqdm \
          matplotlib pytest pytest-benchmark accelerate onnx onnxscript onnxruntime
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: install demo test bench-cpu gpu-check clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(DEPS)
	MAX_JOBS=2 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) -m sparsebert demo
	$(PY) -m sparsebert study --preset cpu-demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

bench-cpu: $(STAMP)
	$(PY) benchmarks/cpu_table.py

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info sparsebert/_C*.so
