# syntax=docker/dockerfile:1
# The CPU inference server (eo-inference-server): Triton-compatible KServe v2 HTTP/gRPC on ONNX Runtime.
#   docker build -f deploy/docker/inference-server.Dockerfile -t <registry>/inference-server:<tag> .
# Models are not in the image: KServe's storage initializer puts the repository in /mnt/models (or mount one).
# Extra: serve. No torch; the build fails if it shows up anyway.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[serve]" \
 && /opt/venv/bin/python -c "import importlib.util, sys; sys.exit('torch must not be in a service image' if importlib.util.find_spec('torch') else 0)" \
 && /opt/venv/bin/eo-inference-server --help > /dev/null

# The LD_PRELOAD library that gives real Triton its restricted-API key from a file (the chart copies it into the
# Triton pod with an init container): tritonserver reads those options from argv only.
# Built on bookworm (glibc 2.36): it uses only long-standing libc symbols, which NVIDIA's Triton images have.
FROM ${PYTHON_IMAGE} AS preload
# The compiler's version does not matter to the output's ABI, and Debian's point releases retire pinned versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY services/inference/triton_restricted_key_preload.c /src/
RUN gcc -shared -fPIC -O2 -Wall -o /src/libeoml_restricted_key.so /src/triton_restricted_key_preload.c

FROM ${PYTHON_IMAGE}
# A fixed numeric UID/GID: Kubernetes can only verify runAsNonRoot against a numeric USER.
RUN groupadd --system --gid 10001 eoml \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin eoml
COPY --from=build /opt/venv /opt/venv
COPY --from=preload /src/libeoml_restricted_key.so /opt/eoml/lib/libeoml_restricted_key.so
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EOML_INFERENCE_HTTP_PORT=8000 \
    EOML_INFERENCE_GRPC_PORT=8001 \
    EOML_INFERENCE_METRICS_PORT=8002
USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('EOML_INFERENCE_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["eo-inference-server"]
CMD ["--model-repository", "/models"]
