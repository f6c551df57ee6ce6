# One entry point for users, CI and developers. Every target sets up what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PERF_VENV ?= .venv-perf
REPOSITORY ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

MODEL_SOURCES := $(wildcard models/*.py) $(wildcard $(REPOSITORY)/*/config.pbtxt)

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
	$(PY) -m pip install --quiet -e '.[serve,models,dev]'
	touch $@

models: $(REPOSITORY)/.build-stamp

$(REPOSITORY)/.build-stamp: $(VENV)/.installed $(MODEL_SOURCES)
	$(PY) -m models.export --repository $(REPOSITORY)
	touch $@

test: install models
	$(PY) -m pytest $(PYTEST_ARGS)

serve: install models
	$(VENV)/bin/eo-inference-server --model-repository $(REPOSITORY) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

demo:
	@echo "make demo: not implemented yet (issue: ML Controller and local platform)"; exit 2

bench:
	@echo "make bench: not implemented yet (issue: inference server benchmark)"; exit 2

deploy:
	@echo "make deploy: not implemented yet (issue: Kubernetes deployment)"; exit 2

deploy-dry-run:
	@echo "make deploy-dry-run: not implemented yet (issue: Kubernetes deployment)"; exit 2

perf-analyzer:
	@echo "make perf-analyzer: not implemented yet (issue: inference server)"; exit 2

clean:
	rm -rf build $(REPOSITORY)/.build-stamp $(REPOSITORY)/*/[0-9]*/model.onnx
