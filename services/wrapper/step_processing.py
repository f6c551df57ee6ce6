"""The ``processed`` transition of a step run: the model is resolved and checked, the input streamed unit by unit
through preprocessing and batched inference, and every unit's results uploaded into the folder the run writes.

Rejected patches are reported (log + WARNING) and the rest goes on; ``NoUsableInput`` when every one was rejected.
Nothing here decides what a run's state is: ``pipeline`` does, from what this returns or raises.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from services.core import tracing
from services.core.contracts import StepMessage
from services.core.metrics import Stage, stage, timed_items
from services.wrapper.batching import batched_inference
from services.wrapper.compression_request import compression_request_of, operating_point
from services.wrapper.generic_task import CLOUD_FILTER_FIELD, QUICKLOOK_SUFFIX, CloudMeter, cloud_filter_of
from services.wrapper.handlers.base import InputUnit, Rejection, StepContext, bits_per_pixel, served_codec
from services.wrapper.inference_client import ServedModel
from services.wrapper.inputs.types import InputError
from services.wrapper.notifications import ProgressReporter, StepNotifier
from services.wrapper.outputs.compressed import OperatingPoint
from services.wrapper.outputs.stac import ModelFacts
from services.wrapper.results import ResultStore, WrittenObject
from services.wrapper.run_stac import StacRecorder, write_documents
from services.wrapper.step_types import NoUsableInput

if TYPE_CHECKING:
    from services.wrapper.runtime import StepRuntime

log = logging.getLogger(__name__)


@dataclass
class Processed:
    """What a run wrote (every object uploaded) and what it counted on the way."""

    served: ServedModel
    created: datetime
    batch_size: int
    units: int
    patches: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    objects: list[WrittenObject] = field(default_factory=list)
    # The run folder's STAC Collection and Items (written after the results, before the manifest).
    stac_objects: list[WrittenObject] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    bits_per_pixel: float | None = None


def rejection_text(rejection: Rejection) -> str:
    return f"Rejected {rejection.patch_id} of {rejection.source}: {rejection.reason}"


def process_input(
    runtime: StepRuntime, message: StepMessage, store: ResultStore, created: datetime, notifier: StepNotifier,
    log_fields: dict[str, Any], *, run_id: str,
) -> Processed:
    """Run the model over the step's input (in ``store``'s bucket) and upload every unit's results with ``store``
    (into the run's attempt folder), then the folder's STAC Collection and Items (``run_stac``)."""
    client, bucket, write_folder = store.client, store.bucket, store.folder
    settings = runtime.settings
    folder, filename = message.S3_bucket_desc.folder, message.S3_bucket_desc.filename
    served = runtime.model_client.resolve()
    runtime.handler.check_model(served)
    batch_size = runtime.batch_size(served)
    compression = compression_point(runtime, message, served)
    cloud_meter = open_cloud_meter(runtime, message)
    with tempfile.TemporaryDirectory(prefix="eoml-run-", dir=settings.spool_dir or None) as spool:
        ctx = StepContext(
            served=served, client=client, bucket=bucket, folder=folder, filename=filename,
            output_folder=write_folder, created=created, settings=settings, limits=runtime.limits,
            spool_dir=spool, cloud_meter=cloud_meter, compression=compression,
        )
        planned = runtime.handler.open(ctx)
        result = Processed(served=served, created=created, batch_size=batch_size, units=len(planned.units))
        progress = ProgressReporter(notifier, len(planned.units), settings.progress_interval_s)
        unit_stats: list[dict[str, Any]] = []
        stac = StacRecorder()
        current: InputUnit | None = None
        collector: Any = None

        def finish_unit() -> None:
            if current is None:
                return
            side = ctx.side_objects.pop(current.index, [])
            if collector is not None and not runtime.handler.collected(collector):
                getattr(collector, "close", lambda: None)()  # a unit of rejections only: nothing to write
                for obj in side:
                    if obj.file.path is not None:
                        os.unlink(obj.file.path)
            elif collector is not None:
                with stage(Stage.WRITE):  # encoding; uploads count in ResultStore
                    written = runtime.handler.write_unit(ctx, current, collector)
                for obj in [*written.objects, *side]:
                    stac.wrote(current, obj)
                    store.put(obj, current.key)
                    if obj.file.path is not None:
                        os.unlink(obj.file.path)  # uploaded: the spool holds one unit at most
                result.patches += written.patches
                if written.stats:
                    unit_stats.append({"input": current.key, **written.stats})
            progress.end_file()

        # Taken here, in the run's thread: the requests go out from the inference pool's threads, where the run's
        # span is not current. Each request names the ``process`` stage as its parent.
        trace_headers = tracing.http_headers()

        def infer(rows: Any) -> Any:
            return runtime.model_client.infer(served, rows, headers=trace_headers)

        for item in batched_inference(
            timed_items(Stage.DOWNLOAD, planned.items), infer, result.batch_size, settings.requests_in_flight,
            runtime.inference_pool,
        ):
            unit = item.unit if isinstance(item, Rejection) else item[0].context.unit
            if unit is not current:
                finish_unit()
                current = unit
                collector = runtime.handler.start_unit(ctx, unit)
                progress.start_file(unit.index + 1, unit.expected_items)
            if isinstance(item, Rejection):
                result.rejections.append(item)
                log.warning("input rejected", extra={**log_fields, "patch_id": item.patch_id,
                                                     "source": item.source, "reason": item.reason})
                notifier.warning(rejection_text(item))
            else:
                work, outputs = item
                stac.saw(unit, work.context)
                runtime.handler.collect(ctx, collector, work, outputs)
            progress.item_done()
        finish_unit()

    if result.patches == 0:
        first = f" (first: {rejection_text(result.rejections[0])})" if result.rejections else ""
        raise NoUsableInput(f"No usable input: all {len(result.rejections)} patch(es)/file(s) were rejected{first}")

    result.objects = list(store.written)
    result.stac_objects = write_documents(
        store, stac, run_id=run_id, task=runtime.spec.name,
        model=ModelFacts(served.name, served.version, served.card.weights), input_folder=folder, created=created)
    result.stats = {"units": result.units, "batch_size": result.batch_size}
    result.bits_per_pixel = bits_per_pixel(unit_stats)
    if result.bits_per_pixel is not None:
        result.stats["bits_per_pixel"] = result.bits_per_pixel
    if unit_stats:
        result.stats["per_input"] = unit_stats
    quicklooks = [obj.key for obj in result.objects if obj.key.endswith(QUICKLOOK_SUFFIX)]
    if quicklooks:
        result.stats["quicklooks"] = quicklooks
    if cloud_meter is not None:
        result.stats["cloud_filter"] = cloud_meter.manifest_entry()
    return result


def compression_point(runtime: StepRuntime, message: StepMessage, served: ServedModel) -> OperatingPoint | None:
    """A compress step's operating point: ``meta_information.compression`` with the deployment's defaults.

    Checked before anything is read, so a malformed field fails the step at once (``InputError``). Other tasks
    pass the field on untouched: it travels with the workflow's ``meta_information``."""
    if runtime.spec.name != "compress":
        return None
    request = compression_request_of(message.meta_information)
    settings = runtime.settings
    return operating_point(request, settings.compress_levels, settings.compress_quantiser_scale,
                           served_codec(served).codec, served.name)


def open_cloud_meter(runtime: StepRuntime, message: StepMessage) -> CloudMeter | None:
    """The step's cloud filter with the served cloud-mask model, when the workflow asks for one.

    ``InputError`` for a malformed filter or a task that does not read Sentinel-2 (both permanent)."""
    rule = cloud_filter_of(message.meta_information)
    if rule is None:
        return None
    if runtime.spec.input_kind != "sentinel2":
        raise InputError(f"meta_information.{CLOUD_FILTER_FIELD} applies to Sentinel-2 steps; task "
                         f"{runtime.spec.name} reads {runtime.spec.input_kind}")
    return CloudMeter.open(runtime.cloud_mask(), rule)
