# syntax=docker/dockerfile:1
# The Wrapper service (eo-wrapper): one image, one task per deployment (EOML_WRAPPER_TASK).
#   docker build -f deploy/docker/wrapper.Dockerfile -t <registry>/wrapper:<tag> .
# Extras: serve (tritonclient, aiohttp), wrapper (S3, rasters, Kafka), kubernetes (the step configuration store).
# No torch: the models extra never enters a service image, and the build fails if torch shows up anyway.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package needs: pyproject, README (its long description) and the services (never models/).
COPY pyproject.toml README.md ./
COPY services ./services
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[serve,wrapper,kubernetes]" \
 && /opt/venv/bin/python -c "import importlib.util, sys; sys.exit('torch must not be in a service image' if importlib.util.find_spec('torch') else 0)" \
 && /opt/venv/bin/eo-wrapper --help > /dev/null

FROM ${PYTHON_IMAGE}
# A fixed numeric UID/GID: Kubernetes can only verify runAsNonRoot against a numeric USER.
RUN groupadd --system --gid 10001 eoml \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin eoml
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EOML_WRAPPER_HTTP_PORT=8080
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EOML_WRAPPER_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["eo-wrapper"]
