"""Task ``uc5-cfactor``: C-factor of 240 m crops, a mosaic per product or a raster per independent patch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from services.wrapper.batching import Work
from services.wrapper.inference_client import ServedModel
from services.wrapper.inputs import InputPatch
from services.wrapper.outputs import (
    PatchMetadata,
    TileRaster,
    assemble_window_raster,
    cut_cfactor_crops,
    mosaic_tile_rasters,
    window_transform,
    write_index_geotiff,
)
from services.wrapper.outputs.windows import CFACTOR_BANDS, CFACTOR_CROP
from services.wrapper.preprocess import sentinel2_input
from services.wrapper.handlers.base import (
    InputUnit,
    StepContext,
    UnitResult,
    unique_names,
    patch_name,
    check_dims,
    unit_interval,
)
from services.wrapper.handlers.sentinel2 import PatchContext, Sentinel2Handler
from services.wrapper.outputs.types import ResultObject


class CFactorHandler(Sentinel2Handler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        check_dims(served, "input", (CFACTOR_BANDS, CFACTOR_CROP, CFACTOR_CROP), "FP32")
        check_dims(served, "output", (1,), "FP32")

    def patch_work(self, ctx: StepContext, unit: InputUnit, patch: InputPatch) -> Work[PatchContext]:
        stack = sentinel2_input(patch.bands, ctx.served.card)
        windows = cut_cfactor_crops(stack)
        where = dataclasses.replace(windows, crops=np.empty((0,), dtype=np.float32))
        return Work(windows.crops, PatchContext(unit, PatchMetadata.from_input_patch(patch), where))

    def keep(self, ctx: StepContext, work: Work[Any], outputs: np.ndarray) -> Any:
        context: PatchContext = work.context
        assert context.windows is not None
        return context.patch, assemble_window_raster(context.windows, unit_interval(outputs, ctx.served.name))

    def write_unit(self, ctx: StepContext, unit: InputUnit, kept: list[Any]) -> UnitResult:
        served = ctx.served
        patches: list[PatchMetadata] = [patch for patch, _ in kept]
        tiled = all(p.i is not None and p.j is not None and p.transform is not None for p in patches)
        crs = {p.crs_wkt for p in patches}
        if tiled and len(crs) == 1:
            # Tiles of one product: one mosaic at 240 m, dropped (no-data) tiles left as nodata.
            tiles = [
                TileRaster(p.i, p.j, raster, window_transform(p.transform, CFACTOR_CROP))  # type: ignore[arg-type]
                for p, raster in kept
            ]
            mosaic, transform = mosaic_tile_rasters(tiles)
            file = write_index_geotiff(
                mosaic, "uc5-cfactor", crs.pop(), transform, served.name, served.version, ctx.created
            )
            return UnitResult([ResultObject(ctx.key(unit, file.suffix), file, len(patches))], len(patches))
        # Independent patches (BigEarthNet): one small raster per patch, in a folder named after the unit.
        names = unique_names([p.patch_id for p in patches], patch_name)
        objects = []
        for (patch, raster), name in zip(kept, names):
            transform = window_transform(patch.transform, CFACTOR_CROP) if patch.transform is not None else None
            file = write_index_geotiff(
                raster, "uc5-cfactor", patch.crs_wkt, transform, served.name, served.version, ctx.created
            )
            objects.append(ResultObject(ctx.key(unit, f"/{name}{file.suffix}"), file, 1))
        return UnitResult(objects, len(patches))

