"""Task ``decompress``: ``.codes`` files decoded back to patch archives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from services.core.model_card import Codec
from services.wrapper.batching import Work
from services.wrapper.inference_client import ModelMismatch, ServedModel
from services.wrapper.inputs.s3_listing import S3ObjectRef
from services.wrapper.outputs import BandScale, OutputFormatError, read_compressed
from services.wrapper.outputs.compressed import (
    CODEBOOK_LEVELS,
    FORMAT_VERSION_RESIDUAL,
    FORMAT_VERSION_RESIDUAL_PRIOR,
    FORMAT_VERSION_TRANSFORM,
    LATENT_SHAPE,
    read_compressed_header,
)
from services.wrapper.outputs.decompressed import ARCHIVE_CONTENT_TYPE, ARCHIVE_SUFFIX, stream_decompressed_archive
from services.wrapper.spool import ArraySpool, spooled_output
from services.wrapper.handlers.base import (
    FileRefused,
    InputUnit,
    Rejection,
    StepContext,
    UnitResult,
    PlannedInput,
    ServedCodec,
    TaskHandler,
    served_codec,
    check_dims,
)
from services.wrapper.handlers.files import FileContext, list_input_files, read_object, file_units
from services.wrapper.outputs.types import ResultObject


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
        check_dims(served, "input", (*LATENT_SHAPE, CODEBOOK_LEVELS), "INT64")
        card = served.card
        if served.output.datatype != "FP32" or served.output.dims != (len(card.bands), 120, 120):
            raise ModelMismatch(f"model {served.name!r} output must be FP32 [{len(card.bands)}, 120, 120]")
        try:
            BandScale.from_card(card)
        except OutputFormatError as error:
            raise ModelMismatch(f"model {served.name!r}: {error}") from None
        served_codec(served)

    def open(self, ctx: StepContext) -> PlannedInput:
        files = list_input_files(ctx, lambda key: key.endswith(".codes"), "a compressed codes file (*.codes)")
        units = file_units(files)
        return PlannedInput(units, self._items(ctx, files, units))

    def _items(self, ctx: StepContext, files: list[S3ObjectRef], units: list[InputUnit]) -> Iterator[Work[Any] | Rejection]:
        expected_scale = BandScale.from_card(ctx.served.card)
        codec = served_codec(ctx.served)
        for obj, unit in zip(files, units):
            data = read_object(ctx, obj)
            if isinstance(data, FileRefused):
                yield Rejection(unit, unit.name, obj.key, data.reason)
                continue
            try:
                mismatch = self._codec_mismatch(ctx, read_compressed_header(data), codec)
                decoded = None if mismatch else read_compressed(data, codec.prior)
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
    def _codec_mismatch(ctx: StepContext, header: dict[str, Any], served: ServedCodec) -> str:
        """Why the served decompressor cannot decode a file of this kind ("" when it can): the file's codec (format
        2: transform codes; formats 1 and 3: residual-VQ codes) must be the card's, and a file coded with a prior
        (formats 2 and 3) must name the card's prior."""
        name = ctx.served.name
        version = header.get("format_version")
        wanted = str(header.get("prior_sha256"))
        if version == FORMAT_VERSION_TRANSFORM:
            if served.codec is not Codec.TRANSFORM_CODES or served.prior is None:
                return (f"codes file is format 2 (transform codes, entropy prior {wanted[:12]}...); model {name!r} "
                        f"decodes codec {served.codec} (residual-VQ codes, formats 1 and 3)")
            if served.prior.sha256 != wanted:
                return (f"codes file was coded with entropy prior {wanted[:12]}...; model {name!r} decodes with "
                        f"prior {served.prior.sha256[:12]}... (compress it again with the matching compressor)")
            return ""
        if served.codec is Codec.TRANSFORM_CODES:
            prior = served.prior.sha256[:12] if served.prior is not None else "?"
            return (f"codes file is format {version} (residual-VQ codes); model {name!r} decodes transform codes "
                    f"(format 2, entropy prior {prior}...): compress it again with the matching compressor")
        if version == FORMAT_VERSION_RESIDUAL_PRIOR and (served.prior is None or served.prior.sha256 != wanted):
            has = f"RVQ prior {served.prior.sha256[:12]}..." if served.prior is not None else "no RVQ prior"
            return (f"codes file is format 3 (residual-VQ codes under RVQ prior {wanted[:12]}...); model {name!r} "
                    f"has {has} on its card (compress it again with the matching compressor)")
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

