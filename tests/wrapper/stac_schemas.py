"""STAC 1.1.0 validation without the network, for the tests of run folders' STAC documents.

The core schemas (Item, Collection, Catalog, GeoJSON Feature/Geometry and their common/datetime/bands parts) are
the ones pystac ships in ``pystac/validation/jsonschemas``: every $ref is resolved from that local registry, and an
unresolvable one fails the test instead of being fetched. The extension schemas (projection, file, raster,
processing) ship in no installable package; ``_check_extension_fields`` checks their fields as the extension
specs define them.
"""

from __future__ import annotations

import re
from typing import Any

from pystac.extensions.raster import DataType
from jsonschema import Draft7Validator
from pystac.validation.local_validator import get_local_schema_cache
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource

SCHEMA_ROOT = "https://schemas.stacspec.org/v1.1.0"


def _registry() -> Registry:
    cache = get_local_schema_cache()

    def retrieve(uri: str) -> Resource:
        if uri not in cache:
            raise NoSuchResource(uri)  # never fetched: the test would fail naming the missing schema
        return Resource.from_contents(cache[uri])

    return Registry(retrieve=retrieve)  # type: ignore[call-arg]


def validate(document: dict[str, Any]) -> None:
    kind = {"Feature": "item", "Collection": "collection"}[document["type"]]
    schema = get_local_schema_cache()[f"{SCHEMA_ROOT}/{kind}-spec/json-schema/{kind}.json"]
    Draft7Validator(schema, registry=_registry()).validate(document)
    _check_extension_fields(document)


def _check_extension_fields(document: dict[str, Any]) -> None:
    """The fields of the extensions the documents use, as their specs define them."""
    properties = document.get("properties", {})
    declared = " ".join(document.get("stac_extensions", []))
    if any(key.startswith("proj:") for key in properties):
        assert "projection/v2.0.0" in declared
        assert re.fullmatch(r"EPSG:\d+", properties["proj:code"])
        if "proj:shape" in properties:
            assert len(properties["proj:shape"]) == 2 and all(isinstance(v, int) and v > 0 for v in properties["proj:shape"])
            assert len(properties["proj:transform"]) in (6, 9)
    if any(key.startswith("processing:") for key in properties):
        assert "processing/v1.2.0" in declared
        assert all(isinstance(v, str) for v in properties["processing:software"].values())
    for asset in document.get("assets", {}).values():
        assert "file/v2.1.0" in declared
        assert isinstance(asset["file:size"], int) and asset["file:size"] >= 0
        assert re.fullmatch(r"1220[0-9a-f]{64}", asset["file:checksum"])  # sha2-256 multihash
        for band in asset.get("raster:bands", []):
            assert "raster/v1.1.0" in declared
            assert band["data_type"] in {t.value for t in DataType}
