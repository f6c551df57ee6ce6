"""Per-task input reading, model-input preparation and result writing, one module per task; ``handler_for`` picks.

``base`` holds what every task shares (units, rejections, the step context, the ``TaskHandler`` interface),
``sentinel2`` and ``files`` the two input sides, and each task its module. A Wrapper deployment runs one task:
``handler_for`` imports that task's module only.
"""

from __future__ import annotations

import importlib

from services.wrapper.handlers.base import (
    FileRefused,
    InputUnit,
    PlannedInput,
    Rejection,
    StepContext,
    TaskHandler,
    UnitResult,
    bits_per_pixel,
    ServedCodec,
    served_codec,
    unique_names,
)
from services.wrapper.tasks import TaskSpec

# task -> (module under services.wrapper.handlers, handler class)
HANDLERS: dict[str, tuple[str, str]] = {
    "ssl-features": ("ssl_features", "SslFeaturesHandler"),
    "classify": ("classify", "ClassifyHandler"),
    "classify-19": ("classify", "ClassifyHandler"),
    "compress": ("compress", "CompressHandler"),
    "decompress": ("decompress", "DecompressHandler"),
    "uc5-cfactor": ("cfactor", "CFactorHandler"),
    "uc6-locust": ("locust", "LocustHandler"),
    "generic": ("generic", "GenericHandler"),
}


def handler_for(spec: TaskSpec) -> TaskHandler:
    module_name, class_name = HANDLERS[spec.name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    handler: TaskHandler = getattr(module, class_name)(spec)
    return handler


__all__ = [
    "HANDLERS",
    "FileRefused",
    "InputUnit",
    "PlannedInput",
    "Rejection",
    "StepContext",
    "TaskHandler",
    "UnitResult",
    "bits_per_pixel",
    "handler_for",
    "ServedCodec",
    "served_codec",
    "unique_names",
]
