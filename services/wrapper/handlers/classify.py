"""Tasks ``classify`` and ``classify-19``: class probabilities of feature files, as ``.classes.json`` and ``.classes.csv``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from services.core.bigearthnet import BIGEARTHNET_19_LABELS, BIGEARTHNET_43_LABELS
from services.wrapper.batching import Work
from services.wrapper.inference_client import ModelMismatch, ServedModel
from services.wrapper.inputs.s3_listing import S3ObjectRef
from services.wrapper.outputs import FeatureSet, OutputFormatError, read_features
from services.wrapper.outputs.classes import CLASSES_CSV_SUFFIX, CLASSES_JSON_SUFFIX, CSV_CONTENT_TYPE
from services.wrapper.outputs.classes import JSON_CONTENT_TYPE as CLASSES_JSON_CONTENT_TYPE
from services.wrapper.outputs.classes import stream_classes_csv, stream_classes_json
from services.wrapper.spool import spooled_output
from services.wrapper.handlers.base import FileRefused, InputUnit, Rejection, StepContext, UnitResult, PlannedInput, TaskHandler
from services.wrapper.handlers.files import FileContext, list_input_files, read_object, file_units
from services.wrapper.outputs.stac import is_stac_document
from services.wrapper.outputs.types import ResultObject

log = logging.getLogger(__name__)


_FEATURE_SUFFIXES = (".features.npz", ".features.json")
_NOT_FEATURES = (".manifest.json", ".classes.json")


def feature_stem(key: str) -> str:
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
            return lower.endswith((".npz", ".json")) and not lower.endswith(_NOT_FEATURES) and not is_stac_document(key)

        candidates = list_input_files(ctx, accept, "a feature file (*.features.npz, *.features.json or a feature list .json)")
        npz_stems = {feature_stem(obj.key) for obj in candidates if obj.key.endswith(".npz")}
        # ssl-features writes both formats: read the compact one.
        files = [obj for obj in candidates if obj.key.endswith(".npz") or feature_stem(obj.key) not in npz_stems]
        units = file_units(files, feature_stem)
        return PlannedInput(units, self._items(ctx, files, units))

    def _items(self, ctx: StepContext, files: list[S3ObjectRef], units: list[InputUnit]) -> Iterator[Work[Any] | Rejection]:
        dimension = ctx.served.input.dims[0]
        for obj, unit in zip(files, units):
            data = read_object(ctx, obj)
            if isinstance(data, FileRefused):
                yield Rejection(unit, unit.name, obj.key, data.reason)
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

