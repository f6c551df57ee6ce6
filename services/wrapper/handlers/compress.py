"""Task ``compress``: codes of every patch, written as ``.codes`` files (split every ``CODES_PATCHES_PER_FILE``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from services.core.transform_codes import LaplaceContextPrior
from services.wrapper.batching import Work
from services.wrapper.inference_client import ModelMismatch, ServedModel
from services.wrapper.inputs.types import PATCH_SIZE_10M
from services.wrapper.outputs import BandScale, OutputFormatError
from services.wrapper.outputs.residual_prior_codes import smaller_residual_file
from services.wrapper.outputs.compressed import CODEBOOK_LEVELS, LATENT_SHAPE, PIXELS_PER_PATCH, write_transform_codes
from services.wrapper.compression_request import operating_point
from services.wrapper.spool import ArraySpool
from services.wrapper.handlers.base import InputUnit, StepContext, UnitResult, served_codec, check_dims
from services.wrapper.handlers.sentinel2 import Sentinel2Handler
from services.wrapper.outputs.types import ResultObject


class CompressHandler(Sentinel2Handler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        check_dims(served, "input", (len(served.card.bands), PATCH_SIZE_10M, PATCH_SIZE_10M), "FP32")
        check_dims(served, "output", (*LATENT_SHAPE, CODEBOOK_LEVELS), "INT64")
        try:
            BandScale.from_card(served.card)
        except OutputFormatError as error:
            raise ModelMismatch(f"model {served.name!r}: {error}") from None
        served_codec(served)

    # Codes ([-1, 9999]: int16) are spooled to disk; a unit's codes file is split every CODES_PATCHES_PER_FILE
    # patches (the format holds at most 8192), each part coded on its own.
    def start_unit(self, ctx: StepContext, unit: InputUnit) -> ArraySpool:
        return ArraySpool(ctx.spool_dir, np.int16)

    def collect(self, ctx: StepContext, collector: Any, work: Work[Any], outputs: np.ndarray) -> None:
        collector.append(outputs.astype(np.int16), [work.context.patch] * outputs.shape[0])

    def write_unit(self, ctx: StepContext, unit: InputUnit, kept: Any) -> UnitResult:
        spool: ArraySpool = kept
        served = ctx.served
        per_file = ctx.settings.codes_patches_per_file
        parts = max(1, -(-len(spool) // per_file))
        codec = served_codec(served)
        point = ctx.compression or operating_point(
            None, ctx.settings.compress_levels, ctx.settings.compress_quantiser_scale, codec.codec, served.name)
        objects: list[ResultObject] = []
        part_stats: list[dict[str, Any]] = []
        try:
            for part in range(parts):
                first, stop = part * per_file, min((part + 1) * per_file, len(spool))
                codes = spool.read(first, stop).astype(np.int64)
                scale = BandScale.from_card(served.card)
                # served_codec gives transform-codes/1 its transform prior, residual-vq/1 an RVQ prior or none.
                if isinstance(codec.prior, LaplaceContextPrior):
                    # Format 2: transform codes with the card's prior at the workflow's operating point (each part
                    # meets a target on its own).
                    compressed = write_transform_codes(
                        codes, point, codec.prior, spool.items[first:stop], scale, served.name, served.version)
                else:
                    # Residual-VQ indices of the first ``levels`` levels: format 1 (per-file histograms), or format 3
                    # (the card's RVQ prior) when that file is smaller.
                    compressed = smaller_residual_file(
                        codes, point.levels, codec.prior, spool.items[first:stop], scale, served.name, served.version)
                del codes
                suffix = compressed.file.suffix if parts == 1 else f".part-{part + 1:04d}{compressed.file.suffix}"
                objects.append(ResultObject(ctx.key(unit, suffix), compressed.file, stop - first))
                part_stats.append(compressed.stats.as_dict())
        finally:
            spool.close()
        stats = part_stats[0] if parts == 1 else sum_compression(part_stats)
        return UnitResult(objects, sum(o.patches for o in objects), {"compression": stats})


def sum_compression(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One unit's compression figures over its parts (bits per pixel recomputed from the totals)."""
    total = dict(parts[0])
    total["patches"] = patches = sum(p["patches"] for p in parts)
    total["file_bytes"] = sum(p["file_bytes"] for p in parts)
    for name in [key for key in total if key.endswith("bits_per_pixel")]:  # averages weighted by patches
        total[name] = sum(p[name] * p["patches"] for p in parts) / patches
    total["bits_per_pixel"] = total["file_bytes"] * 8 / (patches * PIXELS_PER_PATCH)
    total["level_models"] = [p["level_models"] for p in parts]
    total["parts"] = len(parts)
    if parts[0].get("quantiser_scale") is not None:
        # A target is met part by part: each part's scale is listed, the error pooled (mean square over patches).
        total["quantiser_scale"] = [p["quantiser_scale"] for p in parts]
        total["estimated_rms_percent"] = math.sqrt(
            sum(p["estimated_rms_percent"] ** 2 * p["patches"] for p in parts) / patches)
        if parts[0].get("target_met") is not None:
            total["target_met"] = all(p["target_met"] for p in parts)
    return total
