"""What every task handler shares: units, rejections, the step context, result objects, the handler interface.

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

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from services.core.model_card import CardError, Codec, resolve_codec
from services.core.rvq_prior import ResidualVqPrior, RvqPriorError, parse_rvq_prior
from services.core.transform_codes import LaplaceContextPrior, TransformCodesError
from services.wrapper.inference_client import ModelMismatch, ServedModel
from services.wrapper.outputs.compressed import PIXELS_PER_PATCH
from services.wrapper.outputs.keys import sanitise_name, short_hash

if TYPE_CHECKING:  # annotations only: the handler interface stays a shallow module
    from services.wrapper.batching import Work
    from services.wrapper.generic_task import CloudMeter
    from services.wrapper.inputs import InputLimits
    from services.wrapper.inputs.s3_listing import S3Client
    from services.wrapper.outputs.compressed import OperatingPoint
    from services.wrapper.outputs.types import ResultObject
    from services.wrapper.settings import WrapperSettings
    from services.wrapper.tasks import TaskSpec


ROOT_UNIT_NAME = "root"  # the name of the patch-folder unit when the input folder is the bucket root


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
    side_objects: dict[int, list[ResultObject]] = field(default_factory=dict)
    # compress: the workflow's operating point (meta_information.compression with the settings' defaults; None =
    # the defaults).
    compression: OperatingPoint | None = None

    def key(self, unit: InputUnit, suffix: str) -> str:
        return f"{self.output_folder}/{unit.name}{suffix}"


@dataclass(slots=True)
class UnitResult:
    objects: list[ResultObject]
    patches: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PlannedInput:
    units: list[InputUnit]
    items: Iterator[Work[Any] | Rejection]


def unique_names(keys: Sequence[str], name_of: Callable[[str], str]) -> list[str]:
    """A key-safe name per key; names that two keys share get ``-<8 hex of the key>`` so none collide."""
    names = [name_of(key) for key in keys]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [sanitise_name(f"{name}-{short_hash(key)}") if counts[name] > 1 else name for name, key in zip(names, keys)]


def patch_name(patch_id: str) -> str:
    return sanitise_name(patch_id.rstrip("/").rsplit("/", 1)[-1] or "patch")


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


@dataclass(frozen=True, slots=True)
class ServedCodec:
    """What the served compressor's or decompressor's codes are, and the entropy prior they are coded with
    (transform codes: always; residual-VQ codes: an optional static prior, else per-file histograms)."""

    codec: Codec
    # transform-codes/1: the card's transform prior (always); residual-vq/1: the card's RVQ prior, if any.
    prior: LaplaceContextPrior | ResidualVqPrior | None


def served_codec(served: ServedModel) -> ServedCodec:
    """The served model's codec by its card (``services.core.model_card.resolve_codec``: ``card.codec``, or the
    schema 2 fallback on ``entropy_prior``) with its parsed prior; ``ModelMismatch`` when the card names no codec
    this Wrapper handles or its prior is unreadable."""
    try:
        codec = resolve_codec(served.card)
    except CardError as error:
        raise ModelMismatch(f"model {served.name!r}: {error}") from None
    text = served.card.entropy_prior
    try:
        if codec is Codec.TRANSFORM_CODES:
            return ServedCodec(codec, _parse_prior(text))
        return ServedCodec(codec, parse_rvq_prior(text) if text else None)
    except (TransformCodesError, RvqPriorError) as error:
        raise ModelMismatch(f"model {served.name!r} card.entropy_prior: {error}") from None


def check_dims(served: ServedModel, tensor: str, expected: tuple[int, ...], dtype: str) -> None:
    info = served.input if tensor == "input" else served.output
    if info.dims != expected or info.datatype != dtype:
        raise ModelMismatch(
            f"model {served.name!r} {tensor} {info.name!r} is {info.datatype} {list(info.dims)}; "
            f"this task needs {dtype} {list(expected)}"
        )


def unit_interval(outputs: np.ndarray, model: str) -> np.ndarray:
    values = outputs.reshape(-1).astype(np.float32, copy=False)
    if not (np.isfinite(values) & (values >= 0.0) & (values <= 1.0)).all():
        raise ModelMismatch(f"model {model!r} returned values outside [0, 1]")
    return values


@dataclass(frozen=True, slots=True)
class FileRefused:
    """An input file refused before it is read (over the size limit): the reason goes into the step's rejections."""

    reason: str


def bits_per_pixel(unit_stats: Sequence[dict[str, Any]]) -> float | None:
    """Bits per pixel over every compressed file of a step (header and tables included)."""
    compressions = [s["compression"] for s in unit_stats if "compression" in s]
    if not compressions:
        return None
    total_bytes = sum(c["file_bytes"] for c in compressions)
    total_pixels = sum(c["patches"] for c in compressions) * PIXELS_PER_PATCH
    return total_bytes * 8 / total_pixels if total_pixels else None
