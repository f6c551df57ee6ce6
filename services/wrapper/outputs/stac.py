"""A STAC description of one run folder: ``<run folder>/collection.json`` and one Item per output unit.

An output unit is what the step read as one input (a patch folder, an archive, a SAFE product, a feature file);
its Item lists every result object written for it as an asset and sits beside them as ``<unit>.item.json``.
Every href inside the run folder is relative (``./x.tif``), so a copied folder stays a valid catalogue; the links
to the input and to the upstream run are absolute ``s3://`` URLs (they are outside the folder).

What an Item says, and where it comes from:

- geometry / bbox in WGS84: the union of the unit's patch footprints (CRS + transform + 10 m grid shape of the
  input), reprojected by GDAL. A unit whose input carries no georeferencing has none (``geometry: null``) and
  says so in ``eoml:georeferenced: false``;
- ``datetime``: the sensing time in the Sentinel-2 product / patch names (``..._MSIL2A_20170613T101031_...``);
  ``start_datetime``/``end_datetime`` when the unit holds several acquisitions; ``created``: the run time. A unit
  with no sensing time in its names gets the run time as ``datetime`` and ``eoml:datetime_source: "run"``;
- ``proj:code`` (the projection extension) when every footprint shares one CRS, ``proj:shape``/``proj:transform``
  for a single footprint;
- a unit whose input has no georeferencing of its own but comes from an upstream run's Item (a feature file)
  inherits that Item's footprint and sensing time (``eoml:footprint_source: "upstream item"``);
- the model (``processing:software``, ``eoml:model``: name, version, weights identity and its sha256) and the run
  id (``eoml:run_id``);
- per asset: media type, roles (``data``; ``thumbnail`` for quicklooks; ``metadata`` for JSON/CSV records),
  ``file:size`` and ``file:checksum`` (sha256 as a multihash) from the manifest data, and for GeoTIFFs
  ``raster:bands`` (data type, nodata) when the writer says so.

The documents are built from plain facts (``RunFacts``): nothing here reads S3 or the result files.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import pystac
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.errors import CRSError
from rasterio.warp import transform_geom

from services.wrapper.inputs.types import BAND_RESOLUTION_M, PATCH_SIZE_10M
from services.wrapper.outputs.types import OutputFormatError
from services.wrapper.gdal_policy import CrsRefused, parse_crs

COLLECTION_NAME = "collection.json"
ITEM_SUFFIX = ".item.json"
STAC_MEDIA_TYPE = "application/json"
PROCESSING_EXTENSION = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
# Sentinel-2 product and BigEarthNet patch names carry the sensing start: S2A_MSIL2A_20170613T101031_... (some
# BigEarthNet-v1 names drop the hour's leading zero: S2A_MSIL2A_20180413T95032_90_7 is 09:50:32).
_SENSING_TIME = re.compile(r"MSIL(?:1C|2A)_(\d{8})T(\d{5,6})(?!\d)")
_MEDIA_TYPES: Mapping[str, str] = {
    "image/tiff": pystac.MediaType.COG,
    "image/tiff; application=geotiff": pystac.MediaType.COG,
    "image/png": pystac.MediaType.PNG,
}
_METADATA_SUFFIXES = (".json", ".csv")
_QUICKLOOK_SUFFIX = ".png"
_SHA256 = re.compile(r"sha256[=:]([0-9a-f]{64})")
_CORNERS = ((0, 0), (1, 0), (1, 1), (0, 1), (0, 0))


def is_stac_document(key: str) -> bool:
    """The run folder's own STAC files: a next step reading the folder skips them (they are not results)."""
    name = key.rsplit("/", 1)[-1]
    return name == COLLECTION_NAME or name.endswith(ITEM_SUFFIX)


def sensing_time(name: str) -> datetime | None:
    """The acquisition start in a Sentinel-2 product or BigEarthNet patch name, UTC; None when it has none."""
    match = _SENSING_TIME.search(name)
    if match is None:
        return None
    try:
        return datetime.strptime(match.group(1) + match.group(2).zfill(6), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:  # not a time after all (month 13, hour 25): no sensing time
        return None


@dataclass(frozen=True, slots=True)
class Footprint:
    """Where one patch or tile lies: its CRS (any spelling GDAL reads), the 10 m grid's affine transform
    (a, b, c, d, e, f) and shape (rows, cols). All three None for a patch without georeferencing."""

    patch_id: str
    crs: str | None = None
    transform: tuple[float, float, float, float, float, float] | None = None
    shape: tuple[int, int] | None = None

    @classmethod
    def of_patch(cls, patch: Any) -> "Footprint":
        """From the input layer's ``InputPatch``: its CRS/transform describe its 10 m grid, whose shape is a 10 m
        band's (every 10 m band of a patch has one shape; the patch size otherwise)."""
        if patch.crs is None or patch.transform is None:
            return cls(patch.patch_id)
        ten_metre = [array.shape for band, array in patch.bands.items() if BAND_RESOLUTION_M.get(band) == 10]
        rows, cols = ten_metre[0] if ten_metre else (PATCH_SIZE_10M, PATCH_SIZE_10M)
        return cls(patch.patch_id, str(patch.crs), tuple(patch.transform)[:6], (int(rows), int(cols)))

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None and self.shape is not None

    def polygon(self) -> dict[str, Any]:
        """The grid's outline in its own CRS (GeoJSON Polygon)."""
        assert self.transform is not None and self.shape is not None
        a, b, c, d, e, f = self.transform
        rows, cols = self.shape
        ring = [[a * col * cols + b * row * rows + c, d * col * cols + e * row * rows + f] for col, row in _CORNERS]
        return {"type": "Polygon", "coordinates": [ring]}


@dataclass(frozen=True, slots=True)
class RasterFacts:
    """What a GeoTIFF asset's bands hold (``raster:bands``) and, when georeferenced, its own grid (asset-level
    ``proj:shape`` / ``proj:transform``: a result raster is often coarser than the patch it came from)."""

    data_type: str  # numpy dtype name: float32, uint8, uint16
    nodata: float | None = None
    count: int = 1
    shape: tuple[int, int] | None = None
    transform: tuple[float, float, float, float, float, float] | None = None


@dataclass(frozen=True, slots=True)
class RunObject:
    """One object the run wrote (as the manifest lists it); ``key`` is the full S3 key."""

    key: str
    size: int
    sha256: str
    content_type: str
    raster: RasterFacts | None = None


@dataclass(frozen=True, slots=True)
class UpstreamItem:
    """The upstream run's Item for this unit's input (the input is a result of an earlier step): its s3:// URL,
    and its footprint and sensing time, which a unit whose own input carries none (a feature file) inherits."""

    href: str
    geometry: Mapping[str, Any] | None = None
    bbox: Sequence[float] | None = None
    proj_code: str | None = None
    datetimes: tuple[datetime, ...] = ()


@dataclass(frozen=True, slots=True)
class UnitFacts:
    """One output unit: its name (the Item id), the input it was read from, its patches and its objects."""

    name: str
    input_key: str
    footprints: tuple[Footprint, ...]
    objects: tuple[RunObject, ...]
    upstream: UpstreamItem | None = None


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """The served model; ``weights`` is its card's weights identity (``checkpoint:x.pt:sha256=<hex>``,
    ``seeded-init:seed=3``), whose sha256 the Items show on its own where there is one."""

    name: str
    version: str
    weights: str

    @property
    def weights_sha256(self) -> str | None:
        match = _SHA256.search(self.weights)
        return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class RunFacts:
    """Everything the STAC documents of one run say. ``run_folder`` is the key prefix, without a trailing slash."""

    run_id: str
    task: str
    bucket: str
    run_folder: str
    input_bucket: str
    input_folder: str
    created: datetime
    model: ModelFacts
    units: tuple[UnitFacts, ...]
    upstream_collection: str | None = None  # s3:// URL of the upstream run's collection.json
    extra: Mapping[str, Any] = field(default_factory=dict)


def collection_key(run_folder: str) -> str:
    return f"{run_folder}/{COLLECTION_NAME}"


def item_key(run_folder: str, unit_name: str) -> str:
    return f"{run_folder}/{unit_name}{ITEM_SUFFIX}"


def _s3_url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key.lstrip('/')}"


def _relative(run_folder: str, key: str, from_path: str) -> str:
    """``key`` relative to the document at ``from_path`` (its path inside the run folder), as ``./x`` or ``../x``."""
    prefix = run_folder + "/"
    if not key.startswith(prefix):
        raise OutputFormatError(f"object {key!r} is not inside the run folder {run_folder!r}")
    relative = posixpath.relpath(key[len(prefix):], posixpath.dirname(from_path) or ".")
    return relative if relative.startswith("../") else "./" + relative


def item_id(unit_name: str) -> str:
    """A unit's Item id: its name, a per-patch unit's ``<unit>/<patch>`` written ``<unit>__<patch>``."""
    return unit_name.replace("/", "__")


def _wgs84_geometry(footprints: Sequence[Footprint]) -> dict[str, Any] | None:
    """The footprints' outlines in EPSG:4326: a Polygon for one, a MultiPolygon for several; None if any lacks
    georeferencing (a partial footprint would claim less than the unit covers)."""
    if not footprints or not all(f.georeferenced for f in footprints):
        return None
    polygons = []
    for footprint in footprints:
        try:
            polygons.append(transform_geom(footprint.crs, "EPSG:4326", footprint.polygon(), precision=7))
        except (CRSError, ValueError) as error:
            raise OutputFormatError(f"patch {footprint.patch_id}: footprint cannot be reprojected: {error}") from None
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]["coordinates"]}
    return {"type": "MultiPolygon", "coordinates": [p["coordinates"] for p in polygons]}


def _bbox(geometry: Mapping[str, Any]) -> list[float]:
    rings = geometry["coordinates"] if geometry["type"] == "Polygon" else [r for p in geometry["coordinates"] for r in p]
    xs = [point[0] for ring in rings for point in ring]
    ys = [point[1] for ring in rings for point in ring]
    return [min(xs), min(ys), max(xs), max(ys)]


def _epsg_code(crs: str) -> str | None:
    try:
        epsg = parse_crs(crs).to_epsg()
    except (CRSError, CrsRefused):
        return None
    return f"EPSG:{epsg}" if epsg is not None else None


def _roles(obj: RunObject) -> list[str]:
    name = obj.key.lower()
    if name.endswith(_QUICKLOOK_SUFFIX):
        return ["thumbnail", "overview"]
    if name.endswith(_METADATA_SUFFIXES) and ".features." not in name:
        return ["metadata"]
    return ["data"]


def _media_type(obj: RunObject) -> str:
    return _MEDIA_TYPES.get(obj.content_type, obj.content_type)


def _asset(obj: RunObject, run_folder: str, item_path: str) -> pystac.Asset:
    return pystac.Asset(href=_relative(run_folder, obj.key, item_path), media_type=_media_type(obj), roles=_roles(obj),
                        title=obj.key.rsplit("/", 1)[-1])


def _times(unit: UnitFacts, created: datetime) -> tuple[datetime | None, dict[str, Any]]:
    """(datetime, extra properties): the sensing time(s) of the unit's patches (else of its upstream Item), else
    the run time, said so."""
    names = [f.patch_id for f in unit.footprints] or [unit.input_key]
    sensed = sorted({t for t in (sensing_time(name) or sensing_time(unit.input_key) for name in names) if t})
    if not sensed and unit.upstream is not None:
        sensed = sorted(set(unit.upstream.datetimes))
    if not sensed:
        return created, {"eoml:datetime_source": "run"}
    if len(sensed) == 1:
        return sensed[0], {"eoml:datetime_source": "sensing"}
    return None, {"eoml:datetime_source": "sensing", "start_datetime": pystac.utils.datetime_to_str(sensed[0]),
                  "end_datetime": pystac.utils.datetime_to_str(sensed[-1])}


def _item(facts: RunFacts, unit: UnitFacts) -> pystac.Item:
    geometry = _wgs84_geometry(unit.footprints)
    bbox = _bbox(geometry) if geometry else None
    crs_codes = {_epsg_code(f.crs) for f in unit.footprints if f.crs is not None}
    upstream = unit.upstream
    inherited = geometry is None and upstream is not None and upstream.geometry is not None
    if inherited:
        assert upstream is not None and upstream.geometry is not None
        geometry, bbox = dict(upstream.geometry), list(upstream.bbox or _bbox(upstream.geometry))
        crs_codes = {upstream.proj_code}
    when, time_properties = _times(unit, facts.created)
    model = {"name": facts.model.name, "version": facts.model.version, "weights": facts.model.weights}
    if facts.model.weights_sha256:
        model["weights_sha256"] = facts.model.weights_sha256
    properties: dict[str, Any] = {
        **time_properties,
        "created": pystac.utils.datetime_to_str(facts.created),
        "eoml:run_id": facts.run_id,
        "eoml:task": facts.task,
        "eoml:model": model,
        "eoml:patches": [f.patch_id for f in unit.footprints],
        "eoml:georeferenced": geometry is not None,
        "processing:software": {facts.model.name: facts.model.version},
        "processing:lineage": (f"{facts.task} with model {facts.model.name} version {facts.model.version} "
                               f"(weights {facts.model.weights}), run {facts.run_id}"),
    }
    if inherited:
        properties["eoml:footprint_source"] = "upstream item"
    if geometry is None:
        properties["description"] = (
            "no footprint: the input patches carry no georeferencing (CRS and transform)"
            if unit.footprints else "no footprint: this output unit has no patches"
        )
    item = pystac.Item(id=item_id(unit.name), geometry=geometry, bbox=bbox,
                       datetime=when, properties=properties, stac_extensions=[PROCESSING_EXTENSION])
    if "start_datetime" in time_properties:
        item.common_metadata.start_datetime = pystac.utils.str_to_datetime(time_properties["start_datetime"])
        item.common_metadata.end_datetime = pystac.utils.str_to_datetime(time_properties["end_datetime"])
    if geometry is not None and len(crs_codes) == 1 and None not in crs_codes:
        projection = ProjectionExtension.ext(item, add_if_missing=True)
        projection.code = crs_codes.pop()
        if len(unit.footprints) == 1 and not inherited:
            only = unit.footprints[0]
            projection.shape = list(only.shape or ())
            projection.transform = list(only.transform or ())
    item.add_link(pystac.Link(pystac.RelType.DERIVED_FROM, _s3_url(facts.input_bucket, unit.input_key),
                              title="input"))
    if upstream is not None:
        item.add_link(pystac.Link(pystac.RelType.DERIVED_FROM, upstream.href, media_type=pystac.MediaType.JSON,
                                  title="upstream run's item"))
    FileExtension.add_to(item)
    for obj in unit.objects:
        asset = _asset(obj, facts.run_folder, unit.name + ITEM_SUFFIX)
        item.add_asset(_asset_key(obj, unit.name), asset)
        file_info = FileExtension.ext(asset)
        file_info.size = obj.size
        file_info.checksum = "1220" + obj.sha256  # multihash: 0x12 = sha2-256, 0x20 = 32 bytes
        if obj.raster is not None and obj.raster.shape is not None and obj.raster.transform is not None:
            asset_projection = ProjectionExtension.ext(asset, add_if_missing=True)
            asset_projection.shape = list(obj.raster.shape)
            asset_projection.transform = list(obj.raster.transform)
        if obj.raster is not None:
            RasterExtension.ext(asset, add_if_missing=True).bands = [
                RasterBand.create(data_type=DataType(obj.raster.data_type), nodata=obj.raster.nodata)
                for _ in range(obj.raster.count)
            ]
    return item


def _asset_key(obj: RunObject, unit_name: str) -> str:
    """The object's name without the unit's (or patch's) name in front (``classes.tif``, ``quicklook.png``)."""
    name = obj.key.rsplit("/", 1)[-1]
    stem = unit_name.rsplit("/", 1)[-1]
    trimmed = name[len(stem):].lstrip(".-_/") if name.startswith(stem) else name
    return trimmed or name


def build_collection(facts: RunFacts) -> pystac.Collection:
    """The run's Collection with its Items, hrefs set as they will be stored (relative inside the run folder)."""
    if not facts.units:
        raise OutputFormatError("a run with no output units has nothing to describe")
    items = [_item(facts, unit) for unit in facts.units]
    boxes = [item.bbox for item in items if item.bbox]
    spatial = [[min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes)]] if boxes else [[-180.0, -90.0, 180.0, 90.0]]
    instants = [t for item in items for t in (item.datetime, item.common_metadata.start_datetime,
                                              item.common_metadata.end_datetime) if t is not None]
    collection = pystac.Collection(
        id=facts.run_id,
        title=f"{facts.task} results of run {facts.run_id}",
        description=(f"Results of the {facts.task} step (model {facts.model.name} {facts.model.version}) on "
                     f"{_s3_url(facts.input_bucket, facts.input_folder)}; one item per input unit."),
        extent=pystac.Extent(pystac.SpatialExtent(spatial),
                             pystac.TemporalExtent([[min(instants), max(instants)]])),
        license="other",
        extra_fields={"eoml:run_id": facts.run_id, "eoml:task": facts.task,
                      "eoml:georeferenced": bool(boxes), **dict(facts.extra)},
        catalog_type=pystac.CatalogType.SELF_CONTAINED,
    )
    collection.add_link(pystac.Link(pystac.RelType.DERIVED_FROM, _s3_url(facts.input_bucket, facts.input_folder),
                                    title="input folder"))
    if facts.upstream_collection is not None:
        collection.add_link(pystac.Link(pystac.RelType.DERIVED_FROM, facts.upstream_collection,
                                        media_type=pystac.MediaType.JSON, title="upstream run's collection"))
    collection.add_items(items)
    # A local root only to compute relative hrefs; what is stored names no absolute location of its own.
    root = "/eoml-run"
    collection.set_self_href(f"{root}/{COLLECTION_NAME}")
    for item, unit in zip(items, facts.units):
        item.set_self_href(f"{root}/{unit.name}{ITEM_SUFFIX}")
    return collection


def stac_documents(facts: RunFacts) -> dict[str, bytes]:
    """Key -> JSON bytes for the Collection and every Item, ready to be written into the run folder.

    Deterministic for equal facts (sorted keys, no clock), like every other object of the run.
    """
    collection = build_collection(facts)
    documents = {collection_key(facts.run_folder): _encode(
        collection.to_dict(include_self_link=False, transform_hrefs=True))}
    for item, unit in zip(collection.get_items(), facts.units):
        documents[item_key(facts.run_folder, unit.name)] = _encode(
            item.to_dict(include_self_link=False, transform_hrefs=True))
    return documents


def _encode(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")


__all__ = [
    "COLLECTION_NAME",
    "Footprint",
    "ITEM_SUFFIX",
    "ModelFacts",
    "RasterFacts",
    "RunFacts",
    "RunObject",
    "STAC_MEDIA_TYPE",
    "UnitFacts",
    "UpstreamItem",
    "build_collection",
    "collection_key",
    "is_stac_document",
    "item_id",
    "item_key",
    "sensing_time",
    "stac_documents",
]
