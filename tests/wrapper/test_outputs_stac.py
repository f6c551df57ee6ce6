"""STAC documents of a run folder: valid against the STAC 1.1.0 JSON schemas (``stac_schemas``), footprints where
the input has them, sensing times from the product / patch names, relative hrefs."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pystac
import pytest
from outputs_test_data import CREATED, GEOREFERENCED_PATCH, PLAIN_PATCH, SECOND_GEOREFERENCED_PATCH, read_sample_patch
from services.wrapper.outputs import OutputFormatError
from stac_schemas import validate
from services.wrapper.outputs.stac import (
    Footprint,
    ModelFacts,
    RasterFacts,
    RunFacts,
    RunObject,
    UnitFacts,
    UpstreamItem,
    is_stac_document,
    sensing_time,
    stac_documents,
)

RUN_FOLDER = "results/patches-0a1b2c3d/r-00112233445566aa"
MODEL = ModelFacts("bigearthnet-classifier", "3", "checkpoint:classifier.pt:sha256=" + "ab" * 32)


def _object(name: str, content_type: str, raster: RasterFacts | None = None) -> RunObject:
    return RunObject(f"{RUN_FOLDER}/{name}", 1000 + len(name), "cd" * 32, content_type, raster)


def _facts(units: tuple[UnitFacts, ...], upstream: str | None = None) -> RunFacts:
    return RunFacts(run_id="r-00112233445566aa", task="classify", bucket="workflow", run_folder=RUN_FOLDER,
                    input_bucket="workflow", input_folder="patches", created=CREATED, model=MODEL, units=units,
                    upstream_collection=upstream)


def _unit_of_patch(patch_name: str) -> UnitFacts:
    patch = read_sample_patch(patch_name)
    return UnitFacts(
        name=patch_name, input_key=f"patches/{patch_name}", footprints=(Footprint.of_patch(patch),),
        objects=(
            _object(f"{patch_name}.classes.tif", "image/tiff; application=geotiff", RasterFacts("uint8", 255)),
            _object(f"{patch_name}.quicklook.png", "image/png"),
            _object(f"{patch_name}.classes.json", "application/json"),
        ),
    )


def _documents(facts: RunFacts) -> dict[str, dict[str, Any]]:
    return {key: json.loads(body) for key, body in stac_documents(facts).items()}


def test_items_of_real_georeferenced_patches_are_valid_and_lie_where_the_patches_are() -> None:
    patch = read_sample_patch(GEOREFERENCED_PATCH)
    documents = _documents(_facts((_unit_of_patch(GEOREFERENCED_PATCH), _unit_of_patch(SECOND_GEOREFERENCED_PATCH))))
    assert set(documents) == {
        f"{RUN_FOLDER}/collection.json",
        f"{RUN_FOLDER}/{GEOREFERENCED_PATCH}.item.json",
        f"{RUN_FOLDER}/{SECOND_GEOREFERENCED_PATCH}.item.json",
    }
    for document in documents.values():
        validate(document)

    item = documents[f"{RUN_FOLDER}/{GEOREFERENCED_PATCH}.item.json"]
    properties = item["properties"]
    assert properties["proj:code"] == "EPSG:32629"
    assert properties["proj:shape"] == [120, 120]
    assert properties["proj:transform"] == pytest.approx(list(patch.transform)[:6])
    # The footprint's corners are the patch grid's corners, reprojected: recompute them independently of the
    # builder (rasterio.warp.transform on points) and compare with the Item's ring.
    from rasterio.warp import transform as transform_points

    a, b, c, d, e, f = list(patch.transform)[:6]
    xs, ys = [c, c + 120 * a], [f + 120 * e, f]
    lons, lats = transform_points("EPSG:32629", "EPSG:4326", [xs[0], xs[1], xs[1], xs[0]], [ys[1], ys[1], ys[0], ys[0]])
    ring = item["geometry"]["coordinates"][0]
    flat = [value for point in sorted(map(tuple, ring[:4])) for value in point]
    assert flat == pytest.approx([value for point in sorted(zip(lons, lats)) for value in point], abs=1e-6)
    assert item["bbox"] == pytest.approx([min(lons), min(lats), max(lons), max(lats)], abs=1e-6)
    assert -12.0 < item["bbox"][0] < -6.0  # UTM zone 29N: west of Greenwich

    assert properties["datetime"] == "2017-06-17T11:33:21Z"  # from the patch name, not the run
    assert properties["created"] == "2026-01-02T03:04:05Z"
    assert properties["eoml:run_id"] == "r-00112233445566aa"
    assert properties["eoml:model"] == {"name": MODEL.name, "version": "3", "weights": MODEL.weights,
                                        "weights_sha256": "ab" * 32}
    assert properties["processing:software"] == {MODEL.name: "3"}

    assets = item["assets"]
    assert assets["classes.tif"]["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
    assert assets["classes.tif"]["roles"] == ["data"]
    assert assets["classes.tif"]["raster:bands"] == [{"data_type": "uint8", "nodata": 255}]
    assert assets["quicklook.png"]["roles"] == ["thumbnail", "overview"]
    assert assets["classes.json"]["roles"] == ["metadata"]
    assert all(asset["href"] == f"./{GEOREFERENCED_PATCH}.{name}" for name, asset in assets.items())
    assert assets["classes.json"]["file:checksum"] == "1220" + "cd" * 32

    collection = documents[f"{RUN_FOLDER}/collection.json"]
    boxes = [documents[key]["bbox"] for key in documents if key.endswith(".item.json")]
    assert collection["extent"]["spatial"]["bbox"] == [[min(b[0] for b in boxes), min(b[1] for b in boxes),
                                                        max(b[2] for b in boxes), max(b[3] for b in boxes)]]
    assert collection["extent"]["temporal"]["interval"] == [["2017-06-17T11:33:21Z", "2017-06-17T11:33:21Z"]]
    assert sorted(link["href"] for link in collection["links"] if link["rel"] == "item") == [
        f"./{GEOREFERENCED_PATCH}.item.json", f"./{SECOND_GEOREFERENCED_PATCH}.item.json"]


def test_a_patch_without_georeferencing_has_no_footprint_and_says_so() -> None:
    documents = _documents(_facts((_unit_of_patch(PLAIN_PATCH),)))
    item = documents[f"{RUN_FOLDER}/{PLAIN_PATCH}.item.json"]
    validate(item)
    validate(documents[f"{RUN_FOLDER}/collection.json"])
    assert item["geometry"] is None and "bbox" not in item
    assert item["properties"]["eoml:georeferenced"] is False
    assert "no georeferencing" in item["properties"]["description"]
    assert not any(key.startswith("proj:") for key in item["properties"])
    assert item["properties"]["datetime"] == "2017-06-13T10:10:31Z"


def test_a_unit_of_several_acquisitions_has_a_datetime_range_and_a_multipolygon() -> None:
    crs, transform = "EPSG:32633", (10.0, 0.0, 500000.0, 0.0, -10.0, 5300000.0)
    footprints = (
        Footprint("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57", crs, transform, (120, 120)),
        Footprint("S2B_MSIL2A_20180705T101029_N9999_R022_T33UUP_26_58", crs,
                  (10.0, 0.0, 501200.0, 0.0, -10.0, 5300000.0), (120, 120)),
    )
    unit = UnitFacts("archive", "patches/archive.tar", footprints, (_object("archive.features.npz", "application/octet-stream"),))
    item = _documents(_facts((unit,)))[f"{RUN_FOLDER}/archive.item.json"]
    validate(item)
    properties = item["properties"]
    assert properties["datetime"] is None
    assert (properties["start_datetime"], properties["end_datetime"]) == ("2017-06-13T10:10:31Z", "2018-07-05T10:10:29Z")
    assert item["geometry"]["type"] == "MultiPolygon" and len(item["geometry"]["coordinates"]) == 2
    # Easting 500000 is zone 33's central meridian: the west edge lies on 15 E exactly.
    assert item["bbox"][0] == pytest.approx(15.0, abs=1e-7)
    assert properties["proj:code"] == "EPSG:32633" and "proj:shape" not in properties  # no single grid
    assert item["assets"]["features.npz"]["roles"] == ["data"]


def test_a_unit_with_no_sensing_time_in_its_names_uses_the_run_time_and_says_so() -> None:
    unit = UnitFacts("scene", "inputs/scene.features.npz", (Footprint("tile_0_0"),),
                     (_object("scene.classes.csv", "text/csv; charset=utf-8"),))
    item = _documents(_facts((unit,)))[f"{RUN_FOLDER}/scene.item.json"]
    validate(item)
    assert item["properties"]["datetime"] == "2026-01-02T03:04:05Z"
    assert item["properties"]["eoml:datetime_source"] == "run"


def test_links_to_the_input_and_the_upstream_run() -> None:
    upstream_item = "s3://workflow/results/in-11223344/r-aa/S2A_MSIL2A_20170613T101031_39_24.item.json"
    upstream_collection = "s3://workflow/results/in-11223344/r-aa/collection.json"
    unit = UnitFacts(PLAIN_PATCH, f"results/in-11223344/r-aa/{PLAIN_PATCH}.features.npz", (Footprint(PLAIN_PATCH),),
                     (_object(f"{PLAIN_PATCH}.classes.json", "application/json"),),
                     upstream=UpstreamItem(upstream_item))
    documents = _documents(_facts((unit,), upstream=upstream_collection))
    item = documents[f"{RUN_FOLDER}/{PLAIN_PATCH}.item.json"]
    derived = {link["href"] for link in item["links"] if link["rel"] == "derived_from"}
    assert derived == {f"s3://workflow/results/in-11223344/r-aa/{PLAIN_PATCH}.features.npz", upstream_item}
    collection = documents[f"{RUN_FOLDER}/collection.json"]
    assert upstream_collection in {link["href"] for link in collection["links"] if link["rel"] == "derived_from"}


def test_a_copied_run_folder_is_a_readable_catalogue(tmp_path: Path) -> None:
    """Every href inside the folder is relative: pystac reads the copy and finds each asset in it."""
    facts = _facts((_unit_of_patch(GEOREFERENCED_PATCH), _unit_of_patch(PLAIN_PATCH)))
    for key, body in stac_documents(facts).items():
        (tmp_path / key[len(RUN_FOLDER) + 1:]).write_bytes(body)
    for unit in facts.units:
        for obj in unit.objects:
            (tmp_path / obj.key[len(RUN_FOLDER) + 1:]).write_bytes(b"x")
    collection = pystac.Collection.from_file(str(tmp_path / "collection.json"))
    items = list(collection.get_items())
    assert sorted(item.id for item in items) == sorted([GEOREFERENCED_PATCH, PLAIN_PATCH])
    for item in items:
        for asset in item.assets.values():
            assert Path(asset.get_absolute_href()).parent == tmp_path
            assert Path(asset.get_absolute_href()).exists()


def test_documents_are_deterministic_and_refuse_objects_outside_the_run_folder() -> None:
    facts = _facts((_unit_of_patch(PLAIN_PATCH),))
    assert stac_documents(facts) == stac_documents(facts)
    stray = UnitFacts("x", "in/x", (), (RunObject("elsewhere/x.tif", 1, "00" * 32, "image/tiff"),))
    with pytest.raises(OutputFormatError, match="not inside the run folder"):
        stac_documents(_facts((stray,)))
    with pytest.raises(OutputFormatError, match="no output units"):
        stac_documents(_facts(()))


def test_sensing_time_and_stac_document_names() -> None:
    assert sensing_time("S2B_MSIL1C_20240102T103421_N0510_R108_T32TMT_20240102T112233.SAFE") == datetime(
        2024, 1, 2, 10, 34, 21, tzinfo=timezone.utc)
    assert sensing_time("S2A_MSIL2A_20180413T95032_90_7") == datetime(2018, 4, 13, 9, 50, 32, tzinfo=timezone.utc)
    assert sensing_time("patch_12_7") is None and sensing_time("S2A_MSIL2A_20181313T101031_1_2") is None
    assert is_stac_document("r/x/collection.json") and is_stac_document("r/x/p.item.json")
    assert not is_stac_document("r/x/p.features.json") and not is_stac_document("r/x/my-collection.json.bak")


def test_the_schema_check_refuses_what_stac_forbids() -> None:
    """The local schemas do reject a broken Item (so the validations above can fail)."""
    from jsonschema import ValidationError

    item = _documents(_facts((_unit_of_patch(GEOREFERENCED_PATCH),)))[f"{RUN_FOLDER}/{GEOREFERENCED_PATCH}.item.json"]
    for breaks in ({"bbox": "everywhere"}, {"properties": {**item["properties"], "datetime": "yesterday"}},
                   {"geometry": {"type": "Polygon", "coordinates": [[1, 2]]}}):
        with pytest.raises(ValidationError):
            validate({**item, **breaks})


def test_a_feature_file_unit_inherits_the_upstream_items_footprint_and_sensing_time() -> None:
    upstream_documents = _documents(_facts((_unit_of_patch(GEOREFERENCED_PATCH),)))
    upstream_item = upstream_documents[f"{RUN_FOLDER}/{GEOREFERENCED_PATCH}.item.json"]
    upstream = UpstreamItem("s3://workflow/up/item.json", upstream_item["geometry"], upstream_item["bbox"],
                            upstream_item["properties"]["proj:code"],
                            (datetime(2017, 6, 17, 11, 33, 21, tzinfo=timezone.utc),))
    unit = UnitFacts("features", "up/features.features.npz", (Footprint("0_0"),),
                     (_object("features.classes.json", "application/json"),), upstream=upstream)
    item = _documents(_facts((unit,)))[f"{RUN_FOLDER}/features.item.json"]
    validate(item)
    assert item["geometry"] == upstream_item["geometry"] and item["bbox"] == upstream_item["bbox"]
    assert item["properties"]["eoml:footprint_source"] == "upstream item"
    assert item["properties"]["proj:code"] == "EPSG:32629" and "proj:shape" not in item["properties"]
    assert item["properties"]["datetime"] == "2017-06-17T11:33:21Z"
