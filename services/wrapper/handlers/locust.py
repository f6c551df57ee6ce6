"""Task ``uc6-locust``: locust-risk index of ERA5 precipitation/temperature stacks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from services.wrapper.batching import Work
from services.wrapper.inference_client import ModelMismatch, ServedModel
from services.wrapper.inputs.s3_listing import S3ObjectRef
from services.wrapper.outputs import (
    OutputFormatError,
    assemble_window_raster,
    cut_locust_windows,
    window_transform,
    write_index_geotiff,
)
from services.wrapper.outputs.windows import LOCUST_WINDOW
from services.wrapper.preprocess import PatchInvalid, era5_input, read_era5_stack
from services.wrapper.handlers.base import (
    FileRefused,
    InputUnit,
    Rejection,
    StepContext,
    UnitResult,
    PlannedInput,
    TaskHandler,
    check_dims,
    unit_interval,
)
from services.wrapper.handlers.files import FileContext, list_input_files, read_object, file_units
from services.wrapper.outputs.types import ResultObject


class LocustHandler(TaskHandler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        check_dims(served, "input", (4, 2, LOCUST_WINDOW, LOCUST_WINDOW), "FP32")
        check_dims(served, "output", (1,), "FP32")
        if served.card.input_kind != "era5-sequence" or len(served.card.bands) != 2:
            raise ModelMismatch(f"model {served.name!r} card must declare an era5-sequence of 2 variables")

    def open(self, ctx: StepContext) -> PlannedInput:
        files = list_input_files(
            ctx, lambda key: key.lower().endswith((".tif", ".tiff", ".npy")),
            "a precipitation/temperature stack (8-band float32 .tif/.tiff, or .npy [4, 2, H, W])",
        )
        units = file_units(files)
        return PlannedInput(units, self._items(ctx, files, units))

    def _items(self, ctx: StepContext, files: list[S3ObjectRef], units: list[InputUnit]) -> Iterator[Work[Any] | Rejection]:
        for obj, unit in zip(files, units):
            data = read_object(ctx, obj)
            if isinstance(data, FileRefused):
                yield Rejection(unit, unit.name, obj.key, data.reason)
                continue
            try:
                stack = read_era5_stack(data, obj.key)
                windows = cut_locust_windows(era5_input(stack, ctx.served.card))
            except (PatchInvalid, OutputFormatError) as error:
                yield Rejection(unit, unit.name, obj.key, str(error))
                continue
            if len(windows) == 0:
                yield Rejection(unit, unit.name, obj.key, "no 12 x 12 window without missing values")
                continue
            where = dataclasses.replace(windows, crops=np.empty((0,), dtype=np.float32))
            yield Work(windows.crops, FileContext(unit, where, (stack.crs_wkt, stack.transform)))

    def keep(self, ctx: StepContext, work: Work[Any], outputs: np.ndarray) -> Any:
        context: FileContext = work.context
        raster = assemble_window_raster(context.payload, unit_interval(outputs, ctx.served.name))
        crs_wkt, transform = context.extra
        return raster, crs_wkt, transform, len(context.payload)

    def write_unit(self, ctx: StepContext, unit: InputUnit, kept: list[Any]) -> UnitResult:
        (raster, crs_wkt, transform, windows), = kept
        served = ctx.served
        grid_transform = window_transform(transform, LOCUST_WINDOW) if transform is not None else None
        file = write_index_geotiff(raster, "uc6-locust", crs_wkt, grid_transform, served.name, served.version, ctx.created)
        return UnitResult([ResultObject(ctx.key(unit, file.suffix), file, windows)], windows, {"windows": windows})

