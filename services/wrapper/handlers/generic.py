"""Task ``generic``: whatever the model card says (services.wrapper.generic_task): per patch a class or value
GeoTIFF and a quicklook.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.wrapper.batching import Work
from services.wrapper.inference_client import ServedModel
from services.wrapper.inputs import InputPatch
from services.wrapper.preprocess import PatchInvalid
from services.wrapper.generic_task import (
    GenericPatch,
    check_generic_model,
    generic_patch_work,
    patch_outputs,
    pooled_fractions,
)
from services.wrapper.generic_kinds import InputRejected
from services.wrapper.handlers.base import InputUnit, StepContext, UnitResult, TaskHandler, unique_names, patch_name
from services.wrapper.handlers.sentinel2 import Sentinel2Handler
from services.wrapper.outputs.types import ResultObject


class GenericHandler(Sentinel2Handler):
    """Per-pixel card-driven models: per patch a class or value GeoTIFF and a quicklook (see generic_task)."""

    def check_model(self, served: ServedModel) -> None:
        TaskHandler.check_model(self, served)
        check_generic_model(served)

    def patch_work(self, ctx: StepContext, unit: InputUnit, patch: InputPatch) -> Work[GenericPatch]:
        try:
            tiles, context = generic_patch_work(ctx.served.card, unit, patch)
        except InputRejected as error:
            raise PatchInvalid(str(error)) from None
        return Work(tiles, context)

    def add_quicklook(self, ctx: StepContext, unit: InputUnit, patch: InputPatch) -> None:
        """The generic task's quicklooks come with its results (an overlay for classes), not from the input."""

    def keep(self, ctx: StepContext, work: Work[Any], outputs: np.ndarray) -> Any:
        context: GenericPatch = work.context
        max_side = ctx.settings.quicklook_max_side if ctx.settings.quicklooks != "never" else None
        files, entry = patch_outputs(ctx.served, context, outputs, ctx.spool_dir, ctx.created, max_side)
        return context.patch.patch_id, files, entry

    def write_unit(self, ctx: StepContext, unit: InputUnit, kept: list[Any]) -> UnitResult:
        names = unique_names([patch_id for patch_id, _, _ in kept], patch_name)
        objects = [
            ResultObject(ctx.key(unit, f"/{name}{file.suffix}"), file, 1 if index == 0 else 0)
            for (_, files, _), name in zip(kept, names) for index, file in enumerate(files)
        ]
        entries = [entry for _, _, entry in kept]
        stats: dict[str, Any] = {"patches": entries}
        pooled = pooled_fractions(entries)
        if pooled:
            stats["class_fractions"] = pooled
        return UnitResult(objects, len(kept), stats)

