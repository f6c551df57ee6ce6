"""The Wrapper's result files: one writer (bytes in memory) and one reader per task's format.

Uploading to S3 and announcing the result folder are the caller's; these are plain functions of arrays and
metadata. Every writer is deterministic (no clock, no random state: times come in as parameters), so a redelivered
step message writes byte-identical objects under the same keys (``keys.result_key``).

===============  ==========================================  ==============================================
task             writer(s)                                   reader
===============  ==========================================  ==============================================
ssl-features     ``write_features_json``/``_npz``            ``read_features`` (production JSON or npz)
classify         ``write_classes_json``/``_csv``             ``read_classes_json``/``_csv``
compress         ``write_transform_codes`` (format 2, with   ``read_compressed`` (formats 1, 2 and 3; codes
                 the card's entropy prior, rate control)     exact at quantiser scale 1)
                 ``write_compressed`` (format 1, no prior)
                 ``residual_prior_codes`` (format 3: RVQ
                 codes, the card's RVQ prior, if smaller)
decompress       ``write_decompressed_archive`` (tar.gz)     ``read_decompressed_archive``
uc5-cfactor      ``cut_cfactor_crops`` -> model ->           ``read_geotiff``
                 ``assemble_window_raster`` ->
                 ``write_index_geotiff``
uc6-locust       ``cut_locust_windows`` -> model -> same     ``read_geotiff``
===============  ==========================================  ==============================================
"""

from services.wrapper.outputs.classes import (
    ClassResults,
    classification_entries,
    parse_classification_entry,
    read_classes_csv,
    read_classes_json,
    write_classes_csv,
    write_classes_json,
)
from services.wrapper.outputs.compressed import (
    CompressedFile,
    CompressionStats,
    DecodedCodes,
    OperatingPoint,
    keep_levels,
    read_compressed,
    read_compressed_header,
    write_compressed,
    write_transform_codes,
)
from services.wrapper.outputs.decompressed import read_decompressed_archive, write_decompressed_archive
from services.wrapper.outputs.features import FeatureSet, read_features, write_features_json, write_features_npz
from services.wrapper.outputs.keys import PRODUCTION_RESULT_PREFIXES, input_name, result_key, sanitise_name
from services.wrapper.outputs.rasters import GeoRaster, read_geotiff, write_index_geotiff
from services.wrapper.outputs.types import BandScale, OutputFile, OutputFormatError, PatchMetadata
from services.wrapper.outputs.windows import (
    TileRaster,
    Windows,
    assemble_window_raster,
    cut_cfactor_crops,
    cut_locust_windows,
    mosaic_tile_rasters,
    window_transform,
)

__all__ = [
    "BandScale",
    "ClassResults",
    "CompressedFile",
    "CompressionStats",
    "DecodedCodes",
    "FeatureSet",
    "GeoRaster",
    "OutputFile",
    "OutputFormatError",
    "PRODUCTION_RESULT_PREFIXES",
    "PatchMetadata",
    "TileRaster",
    "Windows",
    "assemble_window_raster",
    "classification_entries",
    "cut_cfactor_crops",
    "cut_locust_windows",
    "input_name",
    "keep_levels",
    "mosaic_tile_rasters",
    "parse_classification_entry",
    "read_classes_csv",
    "read_classes_json",
    "read_compressed",
    "read_compressed_header",
    "read_decompressed_archive",
    "read_features",
    "read_geotiff",
    "result_key",
    "sanitise_name",
    "window_transform",
    "write_classes_csv",
    "write_classes_json",
    "write_compressed",
    "write_transform_codes",
    "OperatingPoint",
    "write_decompressed_archive",
    "write_features_json",
    "write_features_npz",
    "write_index_geotiff",
]
