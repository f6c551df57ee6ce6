"""Task ``ssl-features``: one feature vector per patch, written as ``.features.json`` and ``.features.npz``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.wrapper.batching import Work
from services.wrapper.inference_client import ModelMismatch, ServedModel
from services.wrapper.inputs.types import PATCH_SIZE_10M
from services.wrapper.outputs.features import (
    FEATURES_JSON_SUFFIX,
    FEATURES_NPZ_SUFFIX,
    JSON_CONTENT_TYPE,
    NPZ_CONTENT_TYPE,
    stream_features_json,
    stream_features_npz,
)
from services.wrapper.spool import ArraySpool, spooled_output
from services.wrapper.handlers.base import InputUnit, StepContext, UnitResult, check_dims
from services.wrapper.handlers.sentinel2 import Sentinel2Handler
from services.wrapper.outputs.types import ResultObject


class SslFeaturesHandler(Sentinel2Handler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        check_dims(served, "input", (len(served.card.bands), PATCH_SIZE_10M, PATCH_SIZE_10M), "FP32")
        output = served.output
        if output.datatype != "FP32" or len(output.dims) != 1:
            raise ModelMismatch(f"model {served.name!r} output {output.name!r} must be an FP32 vector, is {output.datatype} {list(output.dims)}")

    # Features are spooled to disk as batches come back and written out chunk by chunk: a granule's JSON (~145 KB
    # per patch) is never in memory.
    def start_unit(self, ctx: StepContext, unit: InputUnit) -> ArraySpool:
        return ArraySpool(ctx.spool_dir, np.float32)

    def collect(self, ctx: StepContext, collector: Any, work: Work[Any], outputs: np.ndarray) -> None:
        collector.append(outputs, [work.context.patch] * outputs.shape[0])

    def write_unit(self, ctx: StepContext, unit: InputUnit, kept: Any) -> UnitResult:
        spool: ArraySpool = kept
        try:
            patches = spool.items
            served = ctx.served
            dimension = served.output.dims[0]
            with spooled_output(ctx.spool_dir, FEATURES_JSON_SUFFIX, JSON_CONTENT_TYPE) as (target, made_json):
                stream_features_json(target, spool.chunks(), patches, dimension=dimension)
            with spooled_output(ctx.spool_dir, FEATURES_NPZ_SUFFIX, NPZ_CONTENT_TYPE) as (target, made_npz):
                stream_features_npz(target, spool.chunks(), len(spool), patches, served.name, served.version,
                                    dimension=dimension)
        finally:
            spool.close()
        files = [made_json[0], made_npz[0]]
        return UnitResult([ResultObject(ctx.key(unit, f.suffix), f, len(patches)) for f in files], len(patches))

