# One entry point for users, CI and developers. Every target sets up what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PERF_VENV ?= .venv-perf
PERF_TRITONCLIENT_VERSION ?= 2.51.0
KSERVE_VENV ?= .venv-kserve
KSERVE_VERSION ?= 0.21.0
BENCH_VENV ?= .venv-bench
BENCH_ARGS ?=
REPOSITORY ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

MODEL_SOURCES := $(wildcard models/*.py) $(wildcard $(REPOSITORY)/*/config.pbtxt) services/core/sentinel2.py services/core/bigearthnet.py services/core/model_card.py data/bigearthnet-sample/index.json

.PHONY: help install models test serve demo bench deploy deploy-dry-run perf-analyzer clean

help:
	@echo "make demo            start the local platform and run the sample workflows"
	@echo "make test            run the test suite (installs what it needs)"
	@echo "make install         create $(VENV) with the project and its extras"
	@echo "make models          build and export every model into $(REPOSITORY)/"
	@echo "make serve           run the inference server on $(REPOSITORY)/ (HTTP $(HTTP_PORT), gRPC $(GRPC_PORT), metrics $(METRICS_PORT))"
	@echo "make bench           run the benchmarks, tables on stdout, JSON under bench/results/"
	@echo "make perf-analyzer   install Triton's perf_analyzer into $(PERF_VENV)"
	@echo "make deploy          helm upgrade --install onto the current cluster"
	@echo "make deploy-dry-run  render and validate every manifest into build/manifests/"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[serve,models,wrapper,controller,local,dev]'
	touch $@

models: $(REPOSITORY)/.build-stamp

$(REPOSITORY)/.build-stamp: $(VENV)/.installed $(MODEL_SOURCES)
	$(PY) -m models.export --repository $(REPOSITORY)
	touch $@

test: install models perf-analyzer
	$(PY) -m pytest $(PYTEST_ARGS)

serve: install models
	$(VENV)/bin/eo-inference-server --model-repository $(REPOSITORY) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

demo:
	@echo "make demo: not implemented yet (issue: ML Controller and local platform)"; exit 2

# Our server vs the in-process ONNX Runtime ceiling vs the KServe ModelServer, plus perf_analyzer;
# see bench/README.md. BENCH_ARGS passes options through, e.g. BENCH_ARGS="--duration 4".
bench: install models perf-analyzer $(KSERVE_VENV)/.installed $(BENCH_VENV)/.installed
	PERF_VENV=$(PERF_VENV) $(PY) bench/inference_bench.py --repository $(REPOSITORY) \
	  --kserve-python $(KSERVE_VENV)/bin/python --plot-python $(BENCH_VENV)/bin/python $(BENCH_ARGS)

# KServe pins its own dependencies, so it gets its own venv, with the ONNX Runtime version ours runs.
$(KSERVE_VENV)/.installed: $(VENV)/.installed
	test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet 'kserve==$(KSERVE_VERSION)' \
	  "onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')"
	touch $@

# The bench venv: plotting only (matplotlib is no dependency of the project).
$(BENCH_VENV)/.installed:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet 'matplotlib>=3.8'
	touch $@

deploy:
	@echo "make deploy: not implemented yet (issue: Kubernetes deployment)"; exit 2

deploy-dry-run:
	@echo "make deploy-dry-run: not implemented yet (issue: Kubernetes deployment)"; exit 2

perf-analyzer: $(PERF_VENV)/.installed

# perf_analyzer ships in the tritonclient wheel; it links libb64 (apt) and libcudart (pip) even on CPU.
$(PERF_VENV)/.installed:
	@if ! PATH="$$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y libb64-0d; \
	  else echo "perf_analyzer needs libb64-0d: run 'sudo apt-get install -y libb64-0d', then make again" >&2; exit 1; fi; \
	fi
	test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install --quiet --only-binary=:all: \
	  'tritonclient[all]==$(PERF_TRITONCLIENT_VERSION)' nvidia-cuda-runtime-cu12
	PERF_VENV=$(PERF_VENV) bench/perf_analyzer.sh --version
	touch $@

clean:
	rm -rf build $(REPOSITORY)/.build-stamp $(REPOSITORY)/*/[0-9]*/model.onnx
