"""Triton-compatible inference server backed by ONNX Runtime.

Layers, each usable without the ones above it:
- ``protocol``: KServe v2 / Triton request and response types, dtypes, errors (no transport).
- ``repository`` / ``model_config``: the Triton model-repository layout and ``config.pbtxt``.
- ``runtime``: ONNX Runtime sessions, one per instance.
- ``batching``: Triton-style dynamic batching over the instances of one model version.
- ``model_version``: one served version: request validation, outputs, classification, warm-up.
- ``engine``: model lifecycle (repository, load/unload, polling, readiness) and the entry point frontends call.
- ``http_server``, ``grpc_server``, ``metrics``: thin transports over the engine; ``restricted_api``: Triton's
  ``--http-restricted-api`` / ``--grpc-restricted-protocol`` checks they apply.
- ``cli``: the ``eo-inference-server`` command.
- ``real_triton``, ``triton_onnx_shim``: NVIDIA's real Triton on this machine (``make triton``) with a
  Python-backend ONNX Runtime shim; not used by our server.
"""
