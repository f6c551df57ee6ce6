"""The result of a ``pixel-classes`` card: a georeferenced uint8 class Cloud-Optimized GeoTIFF
with a colour table (``rasters.cog_bytes``).

One band of class codes (the card's ``class_codes``), nodata ``CLASS_NODATA_CODE`` (255), DEFLATE compression,
a GDAL colour table from the card's ``class_colours``, band description ``classes`` and dataset tags
``class_names`` / ``class_codes`` (JSON lists), ``model``, ``model_version`` and ``created``. The bytes depend on
the arguments only (``created`` is a parameter, never the clock), so a redelivered step overwrites in place.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Mapping, Sequence

import numpy as np
from affine import Affine
from services.wrapper.gdal_policy import parse_crs

from services.core.model_card import CLASS_NODATA_CODE
from services.wrapper.outputs.rasters import cog_bytes
from services.wrapper.outputs.types import OutputFormatError

CLASS_RASTER_SUFFIX = ".classes.tif"


def write_class_geotiff(
    codes: np.ndarray,
    crs_wkt: str | None,
    transform: Affine | None,
    class_names: Sequence[str],
    class_codes: Sequence[int],
    colour_table: Mapping[int, tuple[int, int, int, int]],
    model: str,
    model_version: str,
    created: datetime,
) -> bytes:
    if codes.dtype != np.uint8 or codes.ndim != 2 or 0 in codes.shape:
        raise OutputFormatError(f"a class raster is a non-empty uint8 [rows, cols] array, got {codes.dtype} {codes.shape}")
    unknown = sorted(set(np.unique(codes).tolist()) - set(class_codes) - {CLASS_NODATA_CODE})
    if unknown:
        raise OutputFormatError(f"class raster holds codes {unknown} the card does not define")
    if created.tzinfo is None:
        raise OutputFormatError("created must be timezone-aware")
    profile: dict[str, object] = {
        "width": codes.shape[1], "height": codes.shape[0], "count": 1, "dtype": "uint8", "nodata": CLASS_NODATA_CODE,
    }
    if crs_wkt is not None:
        profile["crs"] = parse_crs(crs_wkt)
    if transform is not None:
        profile["transform"] = transform
    stamp = created.astimezone(timezone.utc).isoformat(timespec="seconds")
    tags = {
        "class_names": json.dumps(list(class_names)), "class_codes": json.dumps(list(class_codes)),
        "model": model, "model_version": model_version, "created": stamp,
        "TIFFTAG_DATETIME": created.astimezone(timezone.utc).strftime("%Y:%m:%d %H:%M:%S"),
    }
    return cog_bytes(codes[None], profile, "DEFLATE", ("classes",), tags, colour_table, what="class GeoTIFF")
