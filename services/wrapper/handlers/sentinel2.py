"""The input side shared by the tasks that read Sentinel-2 patches and tiles (ssl-features, compress,
uc5-cfactor, generic): units from the input plan, patch filtering, quicklooks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

from services.wrapper.batching import Work
from services.wrapper.inference_client import ModelMismatch, ServedModel
from services.wrapper.inputs import InputPatch, PatchRejection, iter_plan, plan_input
from services.wrapper.inputs.s3_listing import (
    InputPlan,
    PatchFolderSource,
    SafeGranuleSource,
    TarArchiveSource,
    folder_prefix,
)
from services.wrapper.outputs import OutputFormatError, PatchMetadata, input_name
from services.wrapper.outputs.windows import Windows
from services.wrapper.preprocess import PatchInvalid, check_sentinel2_card, sentinel2_input
from services.wrapper.generic_task import QUICKLOOK_SUFFIX, spool_bytes, true_colour_bands, true_colour_quicklook
from services.wrapper.outputs.quicklook import PNG_CONTENT_TYPE
from services.wrapper.handlers.base import (
    ROOT_UNIT_NAME,
    InputUnit,
    Rejection,
    StepContext,
    PlannedInput,
    TaskHandler,
    unique_names,
    patch_name,
)
from services.wrapper.outputs.types import ResultObject


@dataclass(frozen=True, slots=True)
class PatchContext:
    unit: InputUnit
    patch: PatchMetadata
    windows: Windows | None = None  # uc5: where each crop's value goes (crops dropped)


def plan_units(plan: InputPlan, folder_key: str) -> tuple[InputPlan, list[InputUnit], dict[str, InputUnit]]:
    """Group a plan's sources into units; returns the plan reordered so each unit's sources are contiguous."""
    unit_keys: list[str] = []
    key_of_source: dict[int, str] = {}
    expected: dict[str, int | None] = {}
    for position, source in enumerate(plan.sources):
        if isinstance(source, TarArchiveSource):
            key = source.archive.key
            expected[key] = None
        elif isinstance(source, SafeGranuleSource):
            key = source.product_dir
            expected[key] = None
        else:
            key = folder_key
            count = expected.get(key) or 0
            expected[key] = count + 1
        key_of_source[position] = key
        if key not in unit_keys:
            unit_keys.append(key)
    names = unique_names(unit_keys, lambda key: input_name(key) if key.strip("/") else ROOT_UNIT_NAME)
    units = [InputUnit(i, key, name, expected[key]) for i, (key, name) in enumerate(zip(unit_keys, names))]
    by_key = {unit.key: unit for unit in units}
    order = sorted(range(len(plan.sources)), key=lambda p: (by_key[key_of_source[p]].index, p))
    reordered = dataclasses.replace(plan, sources=tuple(plan.sources[p] for p in order))
    unit_of_source: dict[str, InputUnit] = {}
    for position, source in enumerate(plan.sources):
        unit = by_key[key_of_source[position]]
        if isinstance(source, TarArchiveSource):
            unit_of_source[source.archive.key] = unit
        elif isinstance(source, SafeGranuleSource):
            unit_of_source[source.product_dir] = unit
        elif isinstance(source, PatchFolderSource):
            unit_of_source[source.prefix] = unit
    return reordered, units, unit_of_source


class Sentinel2Handler(TaskHandler):
    """Shared input side of the tasks that read Sentinel-2 patches and tiles."""

    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        try:
            check_sentinel2_card(served.card, served.input.dims)
        except ValueError as error:
            raise ModelMismatch(f"model {served.name!r}: {error}") from None

    def open(self, ctx: StepContext) -> PlannedInput:
        plan = plan_input(ctx.client, ctx.bucket, ctx.folder, ctx.limits, filename=ctx.filename)
        plan, units, unit_of_source = plan_units(plan, folder_prefix(ctx.folder))
        return PlannedInput(units, self._items(ctx, plan, units, unit_of_source))

    def _items(
        self, ctx: StepContext, plan: InputPlan, units: list[InputUnit], unit_of_source: dict[str, InputUnit]
    ) -> Iterator[Work[Any] | Rejection]:
        seen: dict[int, set[str]] = {}
        fallback = units[-1]
        for item in iter_plan(ctx.client, ctx.bucket, plan, ctx.limits):
            unit = unit_of_source.get(item.source, fallback)
            if isinstance(item, PatchRejection):
                yield Rejection(unit, item.patch_id, item.source, item.reason)
                continue
            ids = seen.setdefault(unit.index, set())
            if item.patch_id in ids:
                yield Rejection(unit, item.patch_id, item.source, "a patch with this id was already read from this input")
                continue
            ids.add(item.patch_id)
            if ctx.cloud_meter is not None:
                reason = ctx.cloud_meter.judge(item)
                if reason is not None:
                    yield Rejection(unit, item.patch_id, item.source, reason)
                    continue
            try:
                work = self.patch_work(ctx, unit, item)
            except (PatchInvalid, OutputFormatError) as error:
                yield Rejection(unit, item.patch_id, item.source, str(error))
                continue
            if ctx.settings.quicklooks == "always":
                self.add_quicklook(ctx, unit, item)
            yield work

    def add_quicklook(self, ctx: StepContext, unit: InputUnit, patch: InputPatch) -> None:
        """A true-colour PNG of the patch at ``<unit>/<patch>.quicklook.png`` (none without B02-B04 data)."""
        bands = true_colour_bands(patch)
        data = true_colour_quicklook(bands, ctx.settings.quicklook_max_side) if bands is not None else None
        if data is None:
            return
        file = spool_bytes(ctx.spool_dir, data, QUICKLOOK_SUFFIX, PNG_CONTENT_TYPE)
        key = ctx.key(unit, f"/{patch_name(patch.patch_id)}{QUICKLOOK_SUFFIX}")
        ctx.side_objects.setdefault(unit.index, []).append(ResultObject(key, file, 0))

    def patch_work(self, ctx: StepContext, unit: InputUnit, patch: InputPatch) -> Work[PatchContext]:
        rows = sentinel2_input(patch.bands, ctx.served.card)[None]
        return Work(rows, PatchContext(unit, PatchMetadata.from_input_patch(patch)))
