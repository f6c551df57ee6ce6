#!/usr/bin/env bash
# Triton's perf_analyzer from the .venv-perf made by `make perf-analyzer`, with the CUDA runtime
# library it links against (it needs libcudart even when no GPU is used). Arguments pass through:
#   bench/perf_analyzer.sh -m uc6-locust -u 127.0.0.1:8000 -i http --concurrency-range 1:4
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PERF_VENV:-$root/.venv-perf}"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
binary="$venv/bin/perf_analyzer"
if [[ ! -x "$binary" ]]; then
  echo "perf_analyzer is not installed in $venv: run 'make perf-analyzer'" >&2
  exit 127
fi
cudart_dir="$(echo "$venv"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)"
export LD_LIBRARY_PATH="$cudart_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$binary" "$@"
