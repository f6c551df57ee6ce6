"""Per-task input reading, model-input preparation and result writing; the step pipeline drives them.

A step's input is split into *units*, each of which gets its own result object(s), named after it:

- Sentinel-2 tasks: a tar.gz archive, a SAFE product, or all patch folders stored directly under the folder
  (those form one unit named after the folder);
- ``classify``: one feature file (``*.features.npz``, else ``*.features.json`` or any production feature list
  ``*.json``); ``decompress``: one ``*.codes`` file; ``uc6-locust``: one ``.tif``/``.tiff``/``.npy`` stack.

Every handler yields, in order, ``Work`` items (model-input rows plus a context naming their unit) and
``Rejection`` items (a patch or file refused, with its reason); units are contiguous in that order. Once a unit's
items are through the model, ``write_unit`` turns what ``collect`` kept of them into result files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError

from services.core.bigearthnet import BIGEARTHNET_19_LABELS, BIGEARTHNET_43_LABELS
from services.core.transform_codes import LaplaceContextPrior, TransformCodesError
from services.wrapper.batching import Work
from services.wrapper.inference_client import ModelMismatch, ServedModel
from services.wrapper.inputs import InputLimits, InputPatch, PatchRejection, iter_plan, plan_input
from services.wrapper.inputs.s3_listing import (
    InputPlan,
    PatchFolderSource,
    S3Client,
    S3ObjectRef,
    SafeGranuleSource,
    TarArchiveSource,
    folder_prefix,
    list_objects,
    s3_failure,
)
from services.wrapper.inputs.types import PATCH_SIZE_10M, InputError
from services.wrapper.outputs import (
    BandScale,
    FeatureSet,
    OutputFile,
    OutputFormatError,
    PatchMetadata,
    TileRaster,
    assemble_window_raster,
    cut_cfactor_crops,
    cut_locust_windows,
    input_name,
    mosaic_tile_rasters,
    read_compressed,
    read_features,
    sanitise_name,
    window_transform,
    write_compressed,
    write_index_geotiff,
)
from services.wrapper.outputs.compressed import (
    CODEBOOK_LEVELS,
    FORMAT_VERSION_RESIDUAL,
    FORMAT_VERSION_TRANSFORM,
    LATENT_SHAPE,
    PIXELS_PER_PATCH,
    OperatingPoint,
    read_compressed_header,
    write_transform_codes,
)
from services.wrapper.compression_request import operating_point
from services.wrapper.outputs.windows import CFACTOR_BANDS, CFACTOR_CROP, LOCUST_WINDOW, Windows
from services.wrapper.preprocess import (
    PatchInvalid,
    check_sentinel2_card,
    era5_input,
    read_era5_stack,
    sentinel2_input,
)
from services.wrapper.outputs.classes import CLASSES_CSV_SUFFIX, CLASSES_JSON_SUFFIX, CSV_CONTENT_TYPE
from services.wrapper.outputs.classes import JSON_CONTENT_TYPE as CLASSES_JSON_CONTENT_TYPE
from services.wrapper.outputs.classes import stream_classes_csv, stream_classes_json
from services.wrapper.outputs.decompressed import ARCHIVE_CONTENT_TYPE, ARCHIVE_SUFFIX, stream_decompressed_archive
from services.wrapper.outputs.features import (
    FEATURES_JSON_SUFFIX,
    FEATURES_NPZ_SUFFIX,
    JSON_CONTENT_TYPE,
    NPZ_CONTENT_TYPE,
    stream_features_json,
    stream_features_npz,
)
from services.wrapper.generic_task import (
    QUICKLOOK_SUFFIX,
    CloudMeter,
    GenericPatch,
    check_generic_model,
    generic_patch_work,
    patch_outputs,
    pooled_fractions,
    spool_bytes,
    true_colour_bands,
    true_colour_quicklook,
)
from services.wrapper.generic_kinds import InputRejected
from services.wrapper.outputs.quicklook import PNG_CONTENT_TYPE
from services.wrapper.settings import WrapperSettings
from services.wrapper.spool import ArraySpool, spooled_output
from services.wrapper.tasks import TaskSpec

log = logging.getLogger(__name__)

ROOT_UNIT_NAME = "root"  # the name of the patch-folder unit when the input folder is the bucket root
_FEATURE_SUFFIXES = (".features.npz", ".features.json")
_NOT_FEATURES = (".manifest.json", ".classes.json")


@dataclass(frozen=True, slots=True)
class InputUnit:
    """One input object (or the folder's loose patch folders) and the name its results get."""

    index: int
    key: str  # S3 key (or prefix) it was read from
    name: str  # key-safe, unique within the step
    expected_items: int | None = None  # patches, when known before reading


@dataclass(frozen=True, slots=True)
class Rejection:
    unit: InputUnit
    patch_id: str
    source: str
    reason: str


@dataclass(frozen=True, slots=True)
class StepContext:
    """What one step's handler works with: the served model, the bucket, where results go, and the settings."""

    served: ServedModel
    client: S3Client
    bucket: str
    folder: str
    filename: str
    output_folder: str
    created: datetime
    settings: WrapperSettings
    limits: InputLimits
    spool_dir: str = ""  # where a unit's results are spooled (the run's temporary directory)
    # The workflow's cloud filter, measuring with the served cloud-mask model (Sentinel-2 tasks; None = no filter).
    cloud_meter: CloudMeter | None = None
    # Results written while reading (quicklooks), per unit index; the pipeline uploads them with the unit's.
    side_objects: dict[int, list["ResultObject"]] = field(default_factory=dict)
    # compress: the workflow's operating point (meta_information.compression with the settings' defaults; None =
    # the defaults).
    compression: OperatingPoint | None = None

    def key(self, unit: InputUnit, suffix: str) -> str:
        return f"{self.output_folder}/{unit.name}{suffix}"


@dataclass(frozen=True, slots=True)
class ResultObject:
    key: str
    file: OutputFile
    patches: int


@dataclass(slots=True)
class UnitResult:
    objects: list[ResultObject]
    patches: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PlannedInput:
    units: list[InputUnit]
    items: Iterator[Work[Any] | Rejection]


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def unique_names(keys: Sequence[str], name_of: Callable[[str], str]) -> list[str]:
    """A key-safe name per key; names that two keys share get ``-<8 hex of the key>`` so none collide."""
    names = [name_of(key) for key in keys]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [sanitise_name(f"{name}-{short_hash(key)}") if counts[name] > 1 else name for name, key in zip(names, keys)]


def _patch_name(patch_id: str) -> str:
    return sanitise_name(patch_id.rstrip("/").rsplit("/", 1)[-1] or "patch")


# ---------------------------------------------------------------------------------------------------------------
# Base


class TaskHandler(ABC):
    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def check_model(self, served: ServedModel) -> None:
        """Raise ``ModelMismatch`` when the served model is not one this task can drive."""
        if served.card.task != self.spec.card_task:
            raise ModelMismatch(
                f"model {served.name!r} card says task {served.card.task!r}; task {self.spec.name} needs {self.spec.card_task!r}"
            )
        if len(served.inputs) != 1:
            raise ModelMismatch(f"model {served.name!r} has {len(served.inputs)} inputs; the Wrapper feeds exactly one")

    @abstractmethod
    def open(self, ctx: StepContext) -> PlannedInput:
        """List the step's input (``InputError`` when there is none) and return its units and item stream."""

    def start_unit(self, ctx: StepContext, unit: InputUnit) -> Any:
        """Where a unit's outputs are collected until it is written (default: a list in memory)."""
        return []

    def collect(self, ctx: StepContext, collector: Any, work: Work[Any], outputs: np.ndarray) -> None:
        collector.append(self.keep(ctx, work, outputs))

    def collected(self, collector: Any) -> bool:
        """Whether any item of the unit came back (a unit of rejections only writes nothing)."""
        return len(collector) > 0

    def keep(self, ctx: StepContext, work: Work[Any], outputs: np.ndarray) -> Any:
        """What to keep of one item's outputs until its unit is written (default: context and outputs)."""
        return work.context, outputs

    @abstractmethod
    def write_unit(self, ctx: StepContext, unit: InputUnit, kept: Any) -> UnitResult:
        """Result files of one unit from what ``collect`` kept of its items (in input order)."""


@functools.lru_cache(maxsize=8)
def _parse_prior(text: str) -> LaplaceContextPrior:
    return LaplaceContextPrior.from_text(text)


def served_prior(served: ServedModel) -> LaplaceContextPrior | None:
    """The entropy prior the served compressor's or decompressor's card carries (None: a card without one, which
    means residual-VQ codes in format 1); ``ModelMismatch`` when the card's prior is unreadable."""
    text = served.card.entropy_prior
    if not text:
        return None
    try:
        return _parse_prior(text)
    except TransformCodesError as error:
        raise ModelMismatch(f"model {served.name!r} card.entropy_prior: {error}") from None


def _check_dims(served: ServedModel, tensor: str, expected: tuple[int, ...], dtype: str) -> None:
    info = served.input if tensor == "input" else served.output
    if info.dims != expected or info.datatype != dtype:
        raise ModelMismatch(
            f"model {served.name!r} {tensor} {info.name!r} is {info.datatype} {list(info.dims)}; "
            f"this task needs {dtype} {list(expected)}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Sentinel-2 inputs (ssl-features, compress, uc5-cfactor)


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
        key = ctx.key(unit, f"/{_patch_name(patch.patch_id)}{QUICKLOOK_SUFFIX}")
        ctx.side_objects.setdefault(unit.index, []).append(ResultObject(key, file, 0))

    def patch_work(self, ctx: StepContext, unit: InputUnit, patch: InputPatch) -> Work[PatchContext]:
        rows = sentinel2_input(patch.bands, ctx.served.card)[None]
        return Work(rows, PatchContext(unit, PatchMetadata.from_input_patch(patch)))


class SslFeaturesHandler(Sentinel2Handler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        _check_dims(served, "input", (len(served.card.bands), PATCH_SIZE_10M, PATCH_SIZE_10M), "FP32")
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


class CompressHandler(Sentinel2Handler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        _check_dims(served, "input", (len(served.card.bands), PATCH_SIZE_10M, PATCH_SIZE_10M), "FP32")
        _check_dims(served, "output", (*LATENT_SHAPE, CODEBOOK_LEVELS), "INT64")
        try:
            BandScale.from_card(served.card)
        except OutputFormatError as error:
            raise ModelMismatch(f"model {served.name!r}: {error}") from None
        served_prior(served)

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
        prior = served_prior(served)
        point = ctx.compression or operating_point(
            None, ctx.settings.compress_levels, ctx.settings.compress_quantiser_scale, prior is not None, served.name)
        objects: list[ResultObject] = []
        part_stats: list[dict[str, Any]] = []
        try:
            for part in range(parts):
                first, stop = part * per_file, min((part + 1) * per_file, len(spool))
                codes = spool.read(first, stop).astype(np.int64)
                scale = BandScale.from_card(served.card)
                if prior is not None:
                    # Format 2: transform codes with the card's prior at the workflow's operating point (each part
                    # meets a target on its own).
                    compressed = write_transform_codes(
                        codes, point, prior, spool.items[first:stop], scale, served.name, served.version)
                else:
                    compressed = write_compressed(
                        codes, point.levels, spool.items[first:stop], scale, served.name, served.version)
                del codes
                suffix = compressed.file.suffix if parts == 1 else f".part-{part + 1:04d}{compressed.file.suffix}"
                objects.append(ResultObject(ctx.key(unit, suffix), compressed.file, stop - first))
                part_stats.append(compressed.stats.as_dict())
        finally:
            spool.close()
        stats = part_stats[0] if parts == 1 else _sum_compression(part_stats)
        return UnitResult(objects, sum(o.patches for o in objects), {"compression": stats})


def _sum_compression(parts: list[dict[str, Any]]) -> dict[str, Any]:
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


class CFactorHandler(Sentinel2Handler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        _check_dims(served, "input", (CFACTOR_BANDS, CFACTOR_CROP, CFACTOR_CROP), "FP32")
        _check_dims(served, "output", (1,), "FP32")

    def patch_work(self, ctx: StepContext, unit: InputUnit, patch: InputPatch) -> Work[PatchContext]:
        stack = sentinel2_input(patch.bands, ctx.served.card)
        windows = cut_cfactor_crops(stack)
        where = dataclasses.replace(windows, crops=np.empty((0,), dtype=np.float32))
        return Work(windows.crops, PatchContext(unit, PatchMetadata.from_input_patch(patch), where))

    def keep(self, ctx: StepContext, work: Work[Any], outputs: np.ndarray) -> Any:
        context: PatchContext = work.context
        assert context.windows is not None
        return context.patch, assemble_window_raster(context.windows, _unit_interval(outputs, ctx.served.name))

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
        names = unique_names([p.patch_id for p in patches], _patch_name)
        objects = []
        for (patch, raster), name in zip(kept, names):
            transform = window_transform(patch.transform, CFACTOR_CROP) if patch.transform is not None else None
            file = write_index_geotiff(
                raster, "uc5-cfactor", patch.crs_wkt, transform, served.name, served.version, ctx.created
            )
            objects.append(ResultObject(ctx.key(unit, f"/{name}{file.suffix}"), file, 1))
        return UnitResult(objects, len(patches))


def _unit_interval(outputs: np.ndarray, model: str) -> np.ndarray:
    values = outputs.reshape(-1).astype(np.float32, copy=False)
    if not (np.isfinite(values) & (values >= 0.0) & (values <= 1.0)).all():
        raise ModelMismatch(f"model {model!r} returned values outside [0, 1]")
    return values


# ---------------------------------------------------------------------------------------------------------------
# File inputs (classify, decompress, uc6-locust)


def list_input_files(ctx: StepContext, accept: Callable[[str], bool], expected: str) -> list[S3ObjectRef]:
    """The objects under the step's folder (or its ``filename``) that ``accept`` takes, in key order."""
    prefix = folder_prefix(ctx.folder, ctx.filename)
    if ctx.filename:
        listed = [
            obj for obj in list_objects(ctx.client, ctx.bucket, prefix, ctx.limits)
            if obj.key == prefix or obj.key.startswith(prefix + "/")
        ]
    else:
        listed = list(list_objects(ctx.client, ctx.bucket, prefix + "/" if prefix else "", ctx.limits))
    files = [obj for obj in listed if accept(obj.key)]
    shown = "/".join(part for part in (ctx.folder.strip("/"), ctx.filename.strip("/")) if part)
    if not files:
        found = f"{len(listed)} objects, none is {expected}" + (f"; first: {listed[0].key!r}" if listed else "")
        raise InputError(f"no input found under {shown!r} in bucket {ctx.bucket!r}: {found}", prefix)
    return files


def read_object(ctx: StepContext, obj: S3ObjectRef) -> bytes | str:
    """The object's bytes, or the reason it is refused (over the size limit). S3 failures raise ``InputError``."""
    limit = ctx.settings.max_file_bytes
    if obj.size > limit:
        return f"file is {obj.size} bytes, over the limit of {limit} bytes (EOML_WRAPPER_MAX_FILE_BYTES)"
    try:
        response = ctx.client.get_object(Bucket=ctx.bucket, Key=obj.key)
        with response["Body"] as body:
            data = body.read(limit + 1)
    except (BotoCoreError, ClientError) as error:
        raise s3_failure(error, f"reading {obj.key}", ctx.client, obj.key) from None
    if len(data) > limit:
        return f"file is over the limit of {limit} bytes (EOML_WRAPPER_MAX_FILE_BYTES)"
    return data


def file_units(files: Sequence[S3ObjectRef], strip: Callable[[str], str] = lambda key: key) -> list[InputUnit]:
    keys = [obj.key for obj in files]
    names = unique_names(keys, lambda key: input_name(strip(key)))
    return [InputUnit(i, key, name) for i, (key, name) in enumerate(zip(keys, names))]


@dataclass(frozen=True, slots=True)
class FileContext:
    unit: InputUnit
    payload: Any  # what the task keeps: the feature set, the windows, or one patch's metadata
    extra: Any = None  # file-level facts (codes file info, UC6 georeferencing)


def _feature_stem(key: str) -> str:
    for suffix in _FEATURE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key.rsplit(".", 1)[0]


class ClassifyHandler(TaskHandler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        if served.input.datatype != "FP32" or len(served.input.dims) != 1:
            raise ModelMismatch(f"model {served.name!r} input must be an FP32 vector, is {served.input.datatype} {list(served.input.dims)}")
        if served.output.datatype != "FP32" or len(served.output.dims) != 1:
            raise ModelMismatch(f"model {served.name!r} output must be an FP32 vector of class probabilities")
        self.labels(served)

    @staticmethod
    def labels(served: ServedModel) -> tuple[str, ...]:
        count = served.output.dims[0]
        if served.labels:
            if len(served.labels) != count:
                raise ModelMismatch(f"model {served.name!r} has {len(served.labels)} labels for {count} classes")
            return served.labels
        # A server without the label file (or the classification extension): the BigEarthNet nomenclatures.
        known = {len(BIGEARTHNET_43_LABELS): BIGEARTHNET_43_LABELS, len(BIGEARTHNET_19_LABELS): BIGEARTHNET_19_LABELS}
        if count in known:
            log.warning("model has no label file; using the BigEarthNet nomenclature", extra={"model": served.name, "classes": count})
            return known[count]
        raise ModelMismatch(f"model {served.name!r} has {count} classes and no label file")

    def open(self, ctx: StepContext) -> PlannedInput:
        def accept(key: str) -> bool:
            lower = key.lower()
            return lower.endswith((".npz", ".json")) and not lower.endswith(_NOT_FEATURES)

        candidates = list_input_files(ctx, accept, "a feature file (*.features.npz, *.features.json or a feature list .json)")
        npz_stems = {_feature_stem(obj.key) for obj in candidates if obj.key.endswith(".npz")}
        # ssl-features writes both formats: read the compact one.
        files = [obj for obj in candidates if obj.key.endswith(".npz") or _feature_stem(obj.key) not in npz_stems]
        units = file_units(files, _feature_stem)
        return PlannedInput(units, self._items(ctx, files, units))

    def _items(self, ctx: StepContext, files: list[S3ObjectRef], units: list[InputUnit]) -> Iterator[Work[Any] | Rejection]:
        dimension = ctx.served.input.dims[0]
        for obj, unit in zip(files, units):
            data = read_object(ctx, obj)
            if isinstance(data, str):
                yield Rejection(unit, unit.name, obj.key, data)
                continue
            try:
                feature_set = read_features(data, dimension=dimension)
            except OutputFormatError as error:
                yield Rejection(unit, unit.name, obj.key, f"not a feature file of {dimension}-d vectors: {error}")
                continue
            if len(feature_set) == 0:
                yield Rejection(unit, unit.name, obj.key, "feature file holds no patches")
                continue
            yield Work(feature_set.features, FileContext(unit, feature_set))

    def write_unit(self, ctx: StepContext, unit: InputUnit, kept: list[Any]) -> UnitResult:
        (context, probabilities), = kept
        feature_set: FeatureSet = context.payload
        labels = self.labels(ctx.served)
        threshold = ctx.settings.classify_threshold
        probabilities = probabilities.astype(np.float32, copy=False)
        # Written to disk a chunk of records at a time (a classes JSON repeats each 2048-d vector).
        with spooled_output(ctx.spool_dir, CLASSES_JSON_SUFFIX, CLASSES_JSON_CONTENT_TYPE) as (target, made_json):
            stream_classes_json(target, feature_set, probabilities, labels, threshold)
        with spooled_output(ctx.spool_dir, CLASSES_CSV_SUFFIX, CSV_CONTENT_TYPE) as (target, made_csv):
            stream_classes_csv(target, feature_set, probabilities, labels, threshold)
        files = [made_json[0], made_csv[0]]
        count = len(feature_set)
        return UnitResult([ResultObject(ctx.key(unit, f.suffix), f, count) for f in files], count)


@dataclass(frozen=True, slots=True)
class CodesFile:
    band_scale: BandScale
    model_name: str
    levels: int
    format_version: int = FORMAT_VERSION_RESIDUAL
    quantiser_scale: int | None = None


class DecompressHandler(TaskHandler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        _check_dims(served, "input", (*LATENT_SHAPE, CODEBOOK_LEVELS), "INT64")
        card = served.card
        if served.output.datatype != "FP32" or served.output.dims != (len(card.bands), 120, 120):
            raise ModelMismatch(f"model {served.name!r} output must be FP32 [{len(card.bands)}, 120, 120]")
        try:
            BandScale.from_card(card)
        except OutputFormatError as error:
            raise ModelMismatch(f"model {served.name!r}: {error}") from None
        served_prior(served)

    def open(self, ctx: StepContext) -> PlannedInput:
        files = list_input_files(ctx, lambda key: key.endswith(".codes"), "a compressed codes file (*.codes)")
        units = file_units(files)
        return PlannedInput(units, self._items(ctx, files, units))

    def _items(self, ctx: StepContext, files: list[S3ObjectRef], units: list[InputUnit]) -> Iterator[Work[Any] | Rejection]:
        expected_scale = BandScale.from_card(ctx.served.card)
        prior = served_prior(ctx.served)
        for obj, unit in zip(files, units):
            data = read_object(ctx, obj)
            if isinstance(data, str):
                yield Rejection(unit, unit.name, obj.key, data)
                continue
            try:
                mismatch = self._codec_mismatch(ctx, read_compressed_header(data), prior)
                decoded = None if mismatch else read_compressed(data, prior)
            except OutputFormatError as error:
                yield Rejection(unit, unit.name, obj.key, f"not a readable codes file: {error}")
                continue
            if decoded is None:
                yield Rejection(unit, unit.name, obj.key, mismatch)
                continue
            scale = decoded.band_scale
            if scale.bands != expected_scale.bands or not (
                np.allclose(scale.mean, expected_scale.mean) and np.allclose(scale.std, expected_scale.std)
            ):
                yield Rejection(
                    unit, unit.name, obj.key,
                    f"codes were made for bands {list(scale.bands)} with another normalisation than model "
                    f"{ctx.served.name!r} decodes ({list(expected_scale.bands)})",
                )
                continue
            info = CodesFile(scale, decoded.model_name, decoded.levels, decoded.format_version,
                             decoded.quantiser_scale)
            codes = decoded.codes
            for index, patch in enumerate(decoded.patches):
                # One item per patch: the decoded patches of a file are the largest thing a step holds.
                yield Work(codes[index:index + 1], FileContext(unit, patch, info))

    @staticmethod
    def _codec_mismatch(ctx: StepContext, header: dict[str, Any], prior: LaplaceContextPrior | None) -> str:
        """Why the served decompressor cannot decode a file of this kind ("" when it can): its codes must be the
        kind the model decodes (transform codes with the card's prior, or residual-VQ codes without one)."""
        name = ctx.served.name
        version = header.get("format_version")
        if version == FORMAT_VERSION_TRANSFORM:
            wanted = str(header.get("prior_sha256"))
            if prior is None:
                return (f"codes file is format 2 (transform codes, entropy prior {wanted[:12]}...); model {name!r} "
                        "decodes residual-VQ codes (format 1, no entropy prior on its card)")
            if prior.sha256 != wanted:
                return (f"codes file was coded with entropy prior {wanted[:12]}...; model {name!r} decodes with "
                        f"prior {prior.sha256[:12]}... (compress it again with the matching compressor)")
        elif prior is not None:
            return (f"codes file is format {version} (residual-VQ codes); model {name!r} decodes transform codes "
                    f"(format 2, entropy prior {prior.sha256[:12]}...): compress it again with the matching compressor")
        return ""

    # Decoded patches (576 KB each) are spooled to disk and the archive is written from there chunk by chunk.
    def start_unit(self, ctx: StepContext, unit: InputUnit) -> ArraySpool:
        return ArraySpool(ctx.spool_dir, np.float32)

    def collect(self, ctx: StepContext, collector: Any, work: Work[Any], outputs: np.ndarray) -> None:
        context: FileContext = work.context
        collector.meta = context.extra
        collector.append(outputs, [context.payload] * outputs.shape[0])

    def write_unit(self, ctx: StepContext, unit: InputUnit, kept: Any) -> UnitResult:
        spool: ArraySpool = kept
        info: CodesFile = spool.meta
        try:
            with spooled_output(ctx.spool_dir, ARCHIVE_SUFFIX, ARCHIVE_CONTENT_TYPE) as (target, made):
                stream_decompressed_archive(target, spool.chunks(size=64), info.band_scale, spool.items, ctx.created)
        finally:
            spool.close()
        file = made[0]
        stats: dict[str, Any] = {"levels": info.levels, "codes_model": info.model_name,
                                 "format_version": info.format_version}
        if info.quantiser_scale is not None:
            stats["quantiser_scale"] = info.quantiser_scale
        return UnitResult([ResultObject(ctx.key(unit, file.suffix), file, len(spool))], len(spool), stats)


class LocustHandler(TaskHandler):
    def check_model(self, served: ServedModel) -> None:
        super().check_model(served)
        _check_dims(served, "input", (4, 2, LOCUST_WINDOW, LOCUST_WINDOW), "FP32")
        _check_dims(served, "output", (1,), "FP32")
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
            if isinstance(data, str):
                yield Rejection(unit, unit.name, obj.key, data)
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
        raster = assemble_window_raster(context.payload, _unit_interval(outputs, ctx.served.name))
        crs_wkt, transform = context.extra
        return raster, crs_wkt, transform, len(context.payload)

    def write_unit(self, ctx: StepContext, unit: InputUnit, kept: list[Any]) -> UnitResult:
        (raster, crs_wkt, transform, windows), = kept
        served = ctx.served
        grid_transform = window_transform(transform, LOCUST_WINDOW) if transform is not None else None
        file = write_index_geotiff(raster, "uc6-locust", crs_wkt, grid_transform, served.name, served.version, ctx.created)
        return UnitResult([ResultObject(ctx.key(unit, file.suffix), file, windows)], windows, {"windows": windows})


# ---------------------------------------------------------------------------------------------------------------
# Task ``generic``: whatever the model card says (services.wrapper.generic_task)


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
        names = unique_names([patch_id for patch_id, _, _ in kept], _patch_name)
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


def handler_for(spec: TaskSpec) -> TaskHandler:
    handlers: dict[str, type[TaskHandler]] = {
        "ssl-features": SslFeaturesHandler,
        "classify": ClassifyHandler,
        "classify-19": ClassifyHandler,
        "compress": CompressHandler,
        "decompress": DecompressHandler,
        "uc5-cfactor": CFactorHandler,
        "uc6-locust": LocustHandler,
        "generic": GenericHandler,
    }
    return handlers[spec.name](spec)


def bits_per_pixel(unit_stats: Sequence[dict[str, Any]]) -> float | None:
    """Bits per pixel over every compressed file of a step (header and tables included)."""
    compressions = [s["compression"] for s in unit_stats if "compression" in s]
    if not compressions:
        return None
    total_bytes = sum(c["file_bytes"] for c in compressions)
    total_pixels = sum(c["patches"] for c in compressions) * PIXELS_PER_PATCH
    return total_bytes * 8 / total_pixels if total_pixels else None
