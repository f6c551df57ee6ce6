"""The STAC documents of a run, gathered while it processes and written into its run folder before the manifest.

``StacRecorder`` is fed by the processing loop: the footprint of every patch a unit's work items came from
(``saw``), and each result object while its bytes are still local (``wrote``: a GeoTIFF's header gives its data
type, nodata and, for a unit whose input had no georeferencing of its own, the grid it was written on).
``write_documents`` then reads the upstream run's STAC (when the input folder is an earlier step's run folder),
builds the Collection and Items (``outputs/stac.py``) and uploads them through the run's ``ResultStore`` like every
other result object, so the manifest lists them and nothing is written after the announcement.
"""

from __future__ import annotations

import logging
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rasterio.errors import NotGeoreferencedWarning, RasterioError

from services.wrapper.gdal_policy import GTIFF, NotTheClaimedFormat, open_raster_bytes, open_raster_file
from services.wrapper.handlers.base import InputUnit, patch_name
from services.wrapper.inputs.s3_listing import S3Client
from services.wrapper.outputs.stac import (
    COLLECTION_NAME,
    STAC_MEDIA_TYPE,
    Footprint,
    ModelFacts,
    RasterFacts,
    RunFacts,
    RunObject,
    UnitFacts,
    UpstreamItem,
    ITEM_SUFFIX,
    stac_documents,
)
from services.wrapper.outputs.types import OutputFile, PatchMetadata, ResultObject
from services.wrapper.results import ResultStore, WrittenObject, read_json_object
from services.wrapper.inputs.types import PATCH_SIZE_10M

log = logging.getLogger(__name__)

_TIFF_TYPES = ("image/tiff",)
GEOJSON_MEDIA_TYPE = "application/geo+json"  # a STAC Item is a GeoJSON Feature
MAX_UPSTREAM_ITEMS = 10_000  # an upstream Collection listing more is not followed (its links are still made)


def _patch_footprint(patch: PatchMetadata) -> Footprint:
    if patch.crs_wkt is None or patch.transform is None:
        return Footprint(patch.patch_id)
    return Footprint(patch.patch_id, patch.crs_wkt, patch.transform, (PATCH_SIZE_10M, PATCH_SIZE_10M))


def footprints_of(context: Any) -> list[Footprint]:
    """The patches a work item's context names: a Sentinel-2 patch or tile (``PatchContext.patch``), a decoded
    patch (``FileContext.payload``), or a feature file's patch ids (no georeferencing of their own)."""
    for candidate in (getattr(context, "patch", None), getattr(context, "payload", None)):
        if isinstance(candidate, PatchMetadata):
            return [_patch_footprint(candidate)]
    patch_ids = getattr(getattr(context, "payload", None), "patch_ids", None)
    if isinstance(patch_ids, tuple):
        return [Footprint(str(patch_id)) for patch_id in patch_ids]
    return []


def _raster_header(file: OutputFile) -> tuple[RasterFacts, Footprint | None] | None:
    """A GeoTIFF result's band facts and grid, from its header (the file is still local)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if file.path is not None:
                with open_raster_file(file.path, GTIFF) as dataset:
                    return _facts_of(dataset)
            with open_raster_bytes(file.data, GTIFF) as dataset:
                return _facts_of(dataset)
    except (NotTheClaimedFormat, RasterioError) as error:
        log.warning("result GeoTIFF header not readable for STAC", extra={"reason": str(error)})
        return None


def _facts_of(dataset: Any) -> tuple[RasterFacts, Footprint | None]:
    if dataset.crs is None:
        return RasterFacts(dataset.dtypes[0], dataset.nodata, dataset.count), None
    shape, transform = (dataset.height, dataset.width), tuple(dataset.transform)[:6]
    facts = RasterFacts(dataset.dtypes[0], dataset.nodata, dataset.count, shape, transform)
    return facts, Footprint("", dataset.crs.to_wkt(), transform, shape)


@dataclass
class _UnitRecord:
    unit: InputUnit
    footprints: dict[str, Footprint] = field(default_factory=dict)
    grids: list[Footprint] = field(default_factory=list)


@dataclass
class StacRecorder:
    """What one run's STAC documents need that only the processing loop sees."""

    units: dict[int, _UnitRecord] = field(default_factory=dict)
    rasters: dict[str, RasterFacts] = field(default_factory=dict)

    def _record(self, unit: InputUnit) -> _UnitRecord:
        return self.units.setdefault(unit.index, _UnitRecord(unit))

    def saw(self, unit: InputUnit, context: Any) -> None:
        record = self._record(unit)
        for footprint in footprints_of(context):
            record.footprints.setdefault(footprint.patch_id, footprint)

    def wrote(self, unit: InputUnit, obj: ResultObject) -> None:
        if not obj.file.content_type.startswith(_TIFF_TYPES):
            return
        header = _raster_header(obj.file)
        if header is None:
            return
        facts, grid = header
        self.rasters[obj.key] = facts
        if grid is not None:
            name = obj.key.rsplit("/", 1)[-1]
            self._record(unit).grids.append(Footprint(name, grid.crs, grid.transform, grid.shape))

    def unit_facts(self, objects: list[WrittenObject], upstream: dict[str, UpstreamItem], run_folder: str
                   ) -> tuple[UnitFacts, ...]:
        by_input: dict[str, list[WrittenObject]] = {}
        for obj in objects:
            by_input.setdefault(obj.input_key, []).append(obj)
        facts = []
        for record in sorted(self.units.values(), key=lambda r: r.unit.index):
            written = by_input.get(record.unit.key, [])
            if not written:
                continue  # a unit of rejections only: no results, no Item
            footprints = tuple(record.footprints.values())
            if not any(f.georeferenced for f in footprints) and record.grids and upstream.get(record.unit.key) is None:
                # No georeferencing in the input (a UC6 stack's windows): the result grids say where it lies.
                footprints = tuple(record.grids[:1]) if len(record.grids) == 1 else tuple(record.grids)
            per_patch = _split_by_patch(record, written, run_folder)
            if per_patch is not None:
                # Results per patch (``<unit>/<patch>.tif``, quicklooks): one Item per patch, its own footprint.
                for name, footprint, objects in per_patch:
                    facts.append(UnitFacts(name, record.unit.key, (footprint,), self._objects(objects),
                                           upstream.get(record.unit.key)))
                continue
            facts.append(UnitFacts(
                name=record.unit.name, input_key=record.unit.key, footprints=footprints,
                objects=self._objects(written), upstream=upstream.get(record.unit.key),
            ))
        return tuple(facts)

    def _objects(self, written: list[WrittenObject]) -> tuple[RunObject, ...]:
        return tuple(RunObject(o.key, o.size, o.sha256, o.content_type, self.rasters.get(o.key)) for o in written)


def _split_by_patch(record: _UnitRecord, written: list[WrittenObject], run_folder: str
                    ) -> list[tuple[str, Footprint, list[WrittenObject]]] | None:
    """``(<unit>/<patch name>, footprint, objects)`` per patch when every object of the unit is one patch's
    (``<run folder>/<unit>/<patch name>[-<hash>].<suffix>``, as ``handlers.base.unique_names`` names them);
    None when any object is the unit's as a whole."""
    if len(record.footprints) < 2:
        return None
    prefix = f"{run_folder}/{record.unit.name}/"
    names = {patch_name(patch_id): footprint for patch_id, footprint in record.footprints.items()}
    grouped: dict[str, list[WrittenObject]] = {}
    for obj in written:
        file_name = obj.key[len(prefix):] if obj.key.startswith(prefix) else ""
        stem = re.split(r"[.]", file_name, maxsplit=1)[0]
        owner = stem if stem in names else re.sub(r"-[0-9a-f]{8}$", "", stem)
        if "/" in file_name or owner not in names:
            return None
        grouped.setdefault(owner, []).append(obj)
    return [(f"{record.unit.name}/{name}", names[name], objects) for name, objects in sorted(grouped.items())]


def upstream_items(client: S3Client, bucket: str, input_folder: str) -> tuple[str | None, dict[str, UpstreamItem]]:
    """When the input folder is an earlier run's folder: its Collection's URL, and for each of its result objects
    (full key) the Item that lists it. (None, {}) for any other input."""
    folder = input_folder.strip("/")
    collection = read_json_object(client, bucket, f"{folder}/{COLLECTION_NAME}")
    if not collection:
        return None, {}
    found: dict[str, UpstreamItem] = {}
    links = [link for link in collection.get("links", []) if isinstance(link, dict) and link.get("rel") == "item"]
    for link in links[:MAX_UPSTREAM_ITEMS]:
        href = str(link.get("href", ""))
        if not href.startswith("./"):
            continue
        item_key = f"{folder}/{href[2:]}"
        item = read_json_object(client, bucket, item_key) or {}
        properties = item.get("properties", {}) if isinstance(item.get("properties"), dict) else {}
        upstream = UpstreamItem(
            href=f"s3://{bucket}/{item_key}", geometry=item.get("geometry"), bbox=item.get("bbox"),
            proj_code=properties.get("proj:code"), datetimes=_datetimes(properties),
        )
        for asset in (item.get("assets") or {}).values():
            asset_href = str(asset.get("href", "")) if isinstance(asset, dict) else ""
            if asset_href.startswith(("./", "../")):
                found[posixpath.normpath(posixpath.join(posixpath.dirname(item_key), asset_href))] = upstream
    return f"s3://{bucket}/{folder}/{COLLECTION_NAME}", found


def _datetimes(properties: dict[str, Any]) -> tuple[datetime, ...]:
    values = []
    for name in ("datetime", "start_datetime", "end_datetime"):
        text = properties.get(name)
        if isinstance(text, str):
            try:
                values.append(datetime.fromisoformat(text.replace("Z", "+00:00")))
            except ValueError:
                continue
    return tuple(values)


def write_documents(
    store: ResultStore, recorder: StacRecorder, *, run_id: str, task: str, model: ModelFacts, input_folder: str,
    created: datetime,
) -> list[WrittenObject]:
    """Build the run's STAC documents and upload them into the run folder; the written objects (for the manifest).

    ``ResultWriteError`` when S3 fails (like any other result object)."""
    upstream_collection, upstream = upstream_items(store.client, store.bucket, input_folder)
    units = recorder.unit_facts(list(store.written), upstream, store.folder)
    if not units:
        return []
    facts = RunFacts(run_id=run_id, task=task, bucket=store.bucket, run_folder=store.folder,
                     input_bucket=store.bucket, input_folder=input_folder.strip("/"), created=created, model=model,
                     units=units, upstream_collection=upstream_collection)
    written = []
    for key, body in stac_documents(facts).items():
        media_type = GEOJSON_MEDIA_TYPE if key.endswith(ITEM_SUFFIX) else STAC_MEDIA_TYPE
        document = ResultObject(key, OutputFile(data=body, content_type=media_type, suffix=".json"), patches=0)
        written.append(store.put(document, input_key=""))
    return written


__all__ = ["StacRecorder", "footprints_of", "upstream_items", "write_documents"]
