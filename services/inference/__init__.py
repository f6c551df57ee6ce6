"""Triton-compatible inference server backed by ONNX Runtime.

Layers, each usable without the ones above it:
- ``protocol``: KServe v2 / Triton request and response types, dtypes, errors (no transport).
- ``repository`` / ``model_config``: the Triton model-repository layout and ``config.pbtxt``.
- ``runtime``: ONNX Runtime sessions, one per instance.
- ``batching``: Triton-style dynamic batching over the instances of one model version.
- ``engine``: the server's state (models, versions, control mode, statistics): what frontends call.
- ``http_server``, ``grpc_server``, ``metrics``: thin transports over the engine.
- ``cli``: the ``eo-inference-server`` command.
"""
