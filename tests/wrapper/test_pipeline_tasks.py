"""Every task end to end through ``run_step``: real sample data in moto S3, our inference server on the real model
repository, tansu Kafka. Results are read back from S3, messages and notifications from Kafka.

Expected model outputs are computed independently of the Wrapper: the patch files read with tifffile (not
rasterio), stacked and normalised with the BigEarthNet statistics from ``services.core.sentinel2`` (not the card the
Wrapper reads from the server), and sent in one request over tritonclient HTTP (the Wrapper uses gRPC).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytest
import rasterio
import tritonclient.http as httpclient
from affine import Affine
from rasterio.transform import from_origin

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.core import sentinel2, tracing
from services.core.transform_codes import LaplaceContextPrior
from services.core.bigearthnet import BIGEARTHNET_19_LABELS, BIGEARTHNET_43_LABELS
from services.wrapper.inputs import InputPatch, S3Access, read_tar_stream
from services.wrapper.inputs.settings import InputLimits
from services.wrapper.outputs import (
    read_classes_csv,
    read_classes_json,
    read_compressed,
    read_decompressed_archive,
    read_features,
    read_geotiff,
)
from services.wrapper.outputs import read_compressed_header, write_compressed, write_transform_codes
from services.wrapper.outputs.compressed import PIXELS_PER_PATCH, OperatingPoint
from services.wrapper.outputs.types import BandScale, PatchMetadata
from services.wrapper.outputs.stac import is_stac_document
from services.wrapper.service import parse_delivery
from services.wrapper.results import ANNOUNCED_SUFFIX, MANIFEST_SUFFIX, output_folder
from test_input_safe_products import KEPT_TILES, ORIGIN_X, ORIGIN_Y, PRODUCT, _scene, _upload_tree, _write_safe
from outputs_test_data import (
    GEOREFERENCED_PATCH,
    PLAIN_PATCH,
    SECOND_GEOREFERENCED_PATCH,
    requantised_codes,
    synthetic_prior,
)
from stac_schemas import validate as validate_stac
from wrapper_input_data import SAMPLE_PATCHES, sample_patch_names, sample_tar_gz, upload_patch_folder
from wrapper_stack import (  # noqa: F401 - close_step_runtimes is an autouse fixture
    close_step_runtimes,
    EVENT_TIME,
    InferenceServer,
    StepFixture,
    assert_no_secrets,
    list_keys,
    MODEL_REPOSITORY,
    object_bytes,
)

SSL_MODEL = "Bigearth-net-ssl-label"
COMPRESS_MODEL = "Bigearth-net-compression-compress-pytorch"
DECOMPRESS_MODEL = "Bigearth-net-compression-decompress-pytorch"
DEFAULT_QUANTISER_SCALE = 8  # EOML_WRAPPER_COMPRESS_QUANTISER_SCALE's default
BANDS = sentinel2.SIMCLR_BAND_ORDER
MEAN = np.array([sentinel2.BIGEARTHNET_BAND_MEAN[b] for b in BANDS], dtype=np.float32).reshape(-1, 1, 1)
STD = np.array([sentinel2.BIGEARTHNET_BAND_STD[b] for b in BANDS], dtype=np.float32).reshape(-1, 1, 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log").start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def http_client(server: InferenceServer) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=300.0)
    yield client
    client.close()


def card_prior(client: httpclient.InferenceServerClient, model: str) -> LaplaceContextPrior | None:
    """The entropy prior the served model's card carries (read from the server's config endpoint), or None."""
    parameters = client.get_model_config(model).get("parameters", {})
    text = parameters.get("card.entropy_prior", {}).get("string_value", "")
    return LaplaceContextPrior.from_text(text) if text else None


def reference_infer(client: httpclient.InferenceServerClient, model: str, input_name: str, output_name: str,
                    rows: np.ndarray, datatype: str = "FP32") -> np.ndarray:
    infer_input = httpclient.InferInput(input_name, list(rows.shape), datatype)
    infer_input.set_data_from_numpy(rows, binary_data=True)
    result = client.infer(model, [infer_input], outputs=[httpclient.InferRequestedOutput(output_name)])
    return result.as_numpy(output_name)


def reference_input(bands: dict[str, np.ndarray]) -> np.ndarray:
    stack = sentinel2.stack_bands(bands, BANDS, "bilinear")
    return ((stack - MEAN) / STD).astype(np.float32)


def sample_input(patch: str) -> np.ndarray:
    return reference_input(sentinel2.read_bigearthnet_patch(SAMPLE_PATCHES / patch, BANDS))


def check_reconstruction(folders: dict[str, Any], patches: list[str], reconstruction: np.ndarray) -> None:
    """The archive's 10 m bands are the decompressor's output in digital numbers; 20 m bands on their own grid."""
    digital_numbers = np.clip(np.rint(reconstruction.astype(np.float64) * STD + MEAN), 0, 65535)
    assert sorted(folders) == sorted(patches)
    for index, patch in enumerate(patches):
        bands = folders[patch]
        assert sorted(bands) == sorted(BANDS)
        for channel, band in enumerate(BANDS):
            raster = bands[band]
            assert raster.array.dtype == np.uint16
            if sentinel2.SENTINEL2_RESOLUTION_M[band] == 10:
                # The Wrapper decodes patch by patch, the reference all at once: float sums may differ in the last
                # bit between batch shapes, which moves a value lying on .5 DN by one.
                difference = np.abs(raster.array[0].astype(np.int64) - digital_numbers[index, channel])
                assert difference.max() <= 1 and np.count_nonzero(difference) <= 0.001 * difference.size
            else:
                assert raster.array.shape == (1, 60, 60)


def tile_bands(scene: dict[str, np.ndarray], i: int, j: int) -> dict[str, np.ndarray]:
    """Tile (i, j) of the synthetic SAFE scene: 120 x 120 at 10 m, 60 x 60 at 20 m."""
    out = {}
    for band, array in scene.items():
        side = 120 // (sentinel2.SENTINEL2_RESOLUTION_M[band] // 10)
        out[band] = array[i * side:(i + 1) * side, j * side:(j + 1) * side]
    return out


def make_step(task: str, s3_access: S3Access, kafka_broker: Any, tmp_path: Path) -> StepFixture:
    return StepFixture(s3_access, kafka_broker.bootstrap_servers, tmp_path / "store", task)


def check_announced(step: StepFixture, outcome: Any, meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The next-step message on Topics.out and the notification sequence; returns the notifications."""
    records = step.records([step.topic_out], until=lambda r: len(r) >= 1)
    assert len(records) == 1
    assert records[0]["key"] == "key"
    # A binary-mode CloudEvent: the identity of the upstream run, deterministic (the event's time, not the clock).
    headers = dict(records[0]["headers"])
    # With the OpenTelemetry SDK on in this process (the ``spans`` fixture), the record also carries the trace.
    traceparent = headers.pop("ce_traceparent", None)
    assert traceparent is None or re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]", traceparent)
    assert headers == {
        "ce_specversion": "1.0", "ce_id": f"{outcome.run_folder.rsplit('/', 1)[1]}/{step.topic_out}",
        "ce_source": f"/eoml/{step.namespace}/{step.config.config_name}", "ce_type": "eu.eo4eu.ml.step.completed",
        "ce_time": EVENT_TIME.isoformat(), "content-type": "application/json",
    }
    assert records[0]["value"] == {
        "previous_component_end": "True",
        "S3_bucket_desc": {"folder": outcome.output_folder, "filename": ""},
        "meta_information": meta if meta is not None else {"request": "test", "nested": {"k": [1, 2]}},
    }
    notifications = step.notifications()
    statuses = [n["status"] for n in notifications]
    assert statuses[0] == "START" and statuses[-1] == "SUCCESS"
    assert "CRITICAL" not in statuses
    for notification in notifications:
        assert notification["component_name"] == step.config.component_name
        assert notification["workflow_name"] == step.workflow_name
        assert notification["optional"] == {"namespace": step.namespace, "pod": "wrapper-test-pod"}
        assert len(notification["description"]) <= 300
    progress = [n for n in notifications if n["status"] == "INFO"]
    assert progress and all(n["overwrite"] is True for n in progress)
    assert progress[-1]["description"].startswith(f"Progress file {outcome.stats['units']}/{outcome.stats['units']} : ")
    assert "(100 %)" in progress[-1]["description"]
    assert not step.records([step.dlq_topic], timeout_s=2)
    assert_no_secrets(records, notifications)
    return notifications


def check_manifest(step: StepFixture, outcome: Any) -> dict[str, Any]:
    s3 = step.s3
    # Beside the run folder; its attempt folder (the announced one) holds exactly what it lists: the results
    # (``objects``) and the folder's STAC documents (``stac``).
    manifest = json.loads(object_bytes(s3, step.access.bucket_name, outcome.run_folder + MANIFEST_SUFFIX))
    assert outcome.output_folder == f"{outcome.run_folder}/{manifest['attempt']}"
    assert manifest["attempt"].startswith(f"a-{manifest['outputs_profile']['sha256'][:8]}-")
    keys = sorted(list_keys(s3, step.access.bucket_name, outcome.run_folder + "/"))
    assert sorted(o["key"] for o in [*manifest["objects"], *manifest["stac"]]) == keys
    check_stac(step, outcome, manifest)
    for entry in [*manifest["objects"], *manifest["stac"]]:
        data = object_bytes(s3, step.access.bucket_name, entry["key"])
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["patches"] == outcome.patches
    assert manifest["folder"] == outcome.output_folder
    assert manifest["created"] == EVENT_TIME.isoformat()
    assert_no_secrets(manifest)
    return manifest


def check_stac(step: StepFixture, outcome: Any, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The run folder's STAC: a valid Collection linking valid Items whose assets are exactly the run's results,
    with the manifest's sizes and checksums. Returns the Items."""
    bucket, folder = step.access.bucket_name, outcome.output_folder
    assert manifest["stac"][0]["key"] == f"{folder}/collection.json"
    collection = json.loads(object_bytes(step.s3, bucket, f"{folder}/collection.json"))
    validate_stac(collection)
    assert collection["id"] == manifest["run_id"]
    items, assets = [], {}
    item_keys = [f"{folder}/{link['href'][2:]}" for link in collection["links"] if link["rel"] == "item"]
    for key in item_keys:
        item = json.loads(object_bytes(step.s3, bucket, key))
        validate_stac(item)
        assert item["properties"]["eoml:run_id"] == manifest["run_id"]
        assert item["properties"]["eoml:model"]["weights"] == manifest["model"]["weights"]
        items.append(item)
        for asset in item["assets"].values():  # relative to the Item's own place in the folder
            assets[posixpath.normpath(posixpath.join(posixpath.dirname(key), asset["href"]))] = asset
    assert sorted(item_keys) == sorted(entry["key"] for entry in manifest["stac"][1:])
    assert sorted(assets) == sorted(entry["key"] for entry in manifest["objects"])
    for entry in manifest["objects"]:
        assert assets[entry["key"]]["file:size"] == entry["size"]
        assert assets[entry["key"]]["file:checksum"] == "1220" + entry["sha256"]
    return items


WORKFLOW_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
WORKFLOW_TRACE = f"00-{WORKFLOW_TRACE_ID}-b7ad6b7169203331-01"


def check_one_trace(finished: Sequence[Any], first_steps: int) -> None:
    """ssl-features then two classify steps: one trace. The first step is a child of the workflow event's span,
    each classify step a child of the first step's ``write_manifest`` stage (the manifest records the context its
    record's ce_traceparent carries), every stage of a step a child of that step's span."""
    steps = [span for span in finished if span.name.startswith("step ")]
    assert [span.name for span in steps] == ["step ssl-features", "step classify", "step classify-19"]
    assert {format(span.context.trace_id, "032x") for span in finished} == {WORKFLOW_TRACE_ID}
    ssl_step = steps[0]
    assert format(ssl_step.parent.span_id, "016x") == WORKFLOW_TRACE.split("-")[2]
    stages = {span.name: span for span in finished[:first_steps] if span.parent is not None
              and span.parent.span_id == ssl_step.context.span_id}
    assert sorted(stages) == ["announce", "claim", "process", "write_manifest"]
    for classify_step in steps[1:]:
        assert classify_step.parent.span_id == stages["write_manifest"].context.span_id
        assert classify_step.attributes["eoml.status"] == "SUCCESS"
        assert {span.name for span in finished if span.parent is not None
                and span.parent.span_id == classify_step.context.span_id} == set(stages)


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans this process records (the OpenTelemetry SDK, as the Wrapper's cli configures it)."""
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing("test-wrapper", [SimpleSpanProcessor(exporter)]) is not None
    yield exporter
    exporter.shutdown()


def test_ssl_features_then_classify_43_and_19(
    server: InferenceServer, http_client: Any, s3_access: S3Access, kafka_broker: Any, tmp_path: Path,
    spans: InMemorySpanExporter,
) -> None:
    patches = [PLAIN_PATCH, GEOREFERENCED_PATCH, SECOND_GEOREFERENCED_PATCH]
    ssl = make_step("ssl-features", s3_access, kafka_broker, tmp_path)
    ssl.s3.put_object(Bucket=s3_access.bucket_name, Key="uploads/run 1/component.tar.gz", Body=sample_tar_gz(patches))

    # The workflow's first event carries a trace context (a DSL or gateway that traces).
    outcome = ssl.run(ssl.runtime(server.grpc_url), "uploads/run 1", trace_attributes={"traceparent": WORKFLOW_TRACE})

    assert outcome.status == "SUCCESS", outcome.reason
    assert outcome.output_folder.startswith("result-image2feature/run_1-")
    assert [o.key for o in outcome.objects] == [
        f"{outcome.output_folder}/component.features.json", f"{outcome.output_folder}/component.features.npz"
    ]
    check_announced(ssl, outcome)
    ssl_manifest = check_manifest(ssl, outcome)
    [ssl_item] = check_stac(ssl, outcome, ssl_manifest)
    assert ssl_item["id"] == "component" and ssl_item["properties"]["eoml:patches"] == patches
    # Two acquisitions in the archive: a sensing range from the patch names; one patch has no georeferencing,
    # so the unit claims no footprint.
    assert (ssl_item["properties"]["start_datetime"], ssl_item["properties"]["end_datetime"]) == (
        "2017-06-13T10:10:31Z", "2017-06-17T11:33:21Z")
    assert ssl_item["geometry"] is None and ssl_item["properties"]["eoml:georeferenced"] is False
    as_json = read_features(object_bytes(ssl.s3, s3_access.bucket_name, outcome.objects[0].key))
    as_npz = read_features(object_bytes(ssl.s3, s3_access.bucket_name, outcome.objects[1].key))
    assert as_json.patch_ids == as_npz.patch_ids == tuple(patches)
    np.testing.assert_array_equal(as_json.features, as_npz.features)
    assert (as_npz.model_name, as_npz.model_version) == (SSL_MODEL, "1")
    # Production's JSON: i = position in the input, j = 0 for patches without a grid position.
    raw = json.loads(object_bytes(ssl.s3, s3_access.bucket_name, outcome.objects[0].key))
    assert [(entry["i"], entry["j"]) for entry in raw] == [(0, 0), (1, 0), (2, 0)]
    expected = reference_infer(
        http_client, SSL_MODEL, "input_sentinel2_10_bands_120", "representation_2048",
        np.stack([sample_input(p) for p in patches]),
    )
    np.testing.assert_allclose(as_npz.features, expected, rtol=1e-4, atol=1e-5)

    # The classifier reads where the announcement says the features are.
    record = ssl.records([ssl.topic_out], until=lambda r: len(r) >= 1)[0]
    announced = record["value"]["S3_bucket_desc"]["folder"]
    # The KafkaSource (or the local event plane) turns the record's ce_traceparent header into the CloudEvent
    # attribute traceparent (HTTP ce-traceparent): what the Wrapper's HTTP shell reads from a delivery.
    delivery = parse_delivery({f"ce-{name[3:]}": value for name, value in record["headers"].items()
                               if name.startswith("ce_")}, b"{}")
    next_trace = tracing.event_trace_attributes(delivery.attributes)
    first_steps = len(spans.get_finished_spans())
    for task, model, labels in (
        ("classify", "Bigearth-net-linear-label", BIGEARTHNET_43_LABELS),
        ("classify-19", "Bigearth-net-linear-label-19", BIGEARTHNET_19_LABELS),
    ):
        step = make_step(task, s3_access, kafka_broker, tmp_path)
        result = step.run(step.runtime(server.grpc_url, classify_threshold=0.5), announced,
                          trace_attributes=next_trace)
        assert result.status == "SUCCESS", result.reason
        check_announced(step, result)
        manifest = check_manifest(step, result)
        [item] = check_stac(step, result, manifest)
        upstream_links = {link["href"] for link in item["links"] if link["rel"] == "derived_from"}
        assert upstream_links == {f"s3://{s3_access.bucket_name}/{announced}/component.features.npz",
                                  f"s3://{s3_access.bucket_name}/{announced}/component.item.json"}
        assert item["properties"]["start_datetime"] == "2017-06-13T10:10:31Z"
        json_key, csv_key = (o.key for o in result.objects)
        assert json_key.endswith("/component.classes.json") and csv_key.endswith("/component.classes.csv")
        classes = read_classes_json(object_bytes(step.s3, s3_access.bucket_name, json_key))
        table = read_classes_csv(object_bytes(step.s3, s3_access.bucket_name, csv_key))
        assert classes.label_names == table.label_names == labels  # from the server's label file
        assert classes.patch_ids == table.patch_ids == tuple(patches)
        probabilities = reference_infer(http_client, model, "representation_2048", "classes_probability", as_npz.features)
        np.testing.assert_allclose(classes.probabilities, probabilities, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(classes.probabilities, table.probabilities)
        for row, predicted in enumerate(classes.predicted):
            assert set(predicted) == {labels[i] for i in np.flatnonzero(probabilities[row] >= 0.5)}
        np.testing.assert_array_equal(classes.features, as_npz.features)
    check_one_trace(spans.get_finished_spans(), first_steps)


def test_compress_then_decompress_round_trip(
    server: InferenceServer, http_client: Any, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    patches = [GEOREFERENCED_PATCH, PLAIN_PATCH]
    compress = make_step("compress", s3_access, kafka_broker, tmp_path)
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key="in/pair.tar.gz", Body=sample_tar_gz(patches))

    outcome = compress.run(compress.runtime(server.grpc_url), "in")

    assert outcome.status == "SUCCESS", outcome.reason
    notifications = check_announced(compress, outcome)
    manifest = check_manifest(compress, outcome)
    (codes_object,) = outcome.objects
    assert codes_object.key == f"{outcome.output_folder}/pair.codes"
    data = object_bytes(compress.s3, s3_access.bucket_name, codes_object.key)
    prior = card_prior(http_client, COMPRESS_MODEL)
    decoded = read_compressed(data, prior)
    reference_codes = reference_infer(
        http_client, COMPRESS_MODEL, "input_sentinel2_10_bands_120", "int64_latent32_15",
        np.stack([sample_input(p) for p in patches]),
    )
    # A compressor with an entropy prior writes format 2 at the default scale; one without, format 1 (exact codes).
    expected_codes = reference_codes if prior is None else requantised_codes(reference_codes, DEFAULT_QUANTISER_SCALE, 8)
    np.testing.assert_array_equal(decoded.codes, expected_codes)
    assert decoded.levels == 8
    assert [p.patch_id for p in decoded.patches] == patches
    assert decoded.band_scale.bands == BANDS
    bpp = len(data) * 8 / (len(patches) * PIXELS_PER_PATCH)
    assert manifest["stats"]["bits_per_pixel"] == pytest.approx(bpp)
    assert f"{bpp:.3f} bits per pixel" in notifications[-1]["description"]

    announced = compress.records([compress.topic_out], until=lambda r: len(r) >= 1)[0]["value"]["S3_bucket_desc"]["folder"]
    decompress = make_step("decompress", s3_access, kafka_broker, tmp_path)
    result = decompress.run(decompress.runtime(server.grpc_url), announced)

    assert result.status == "SUCCESS", result.reason
    check_announced(decompress, result)
    check_manifest(decompress, result)
    (archive_object,) = result.objects
    assert archive_object.key == f"{result.output_folder}/pair.tar.gz"
    archive = object_bytes(decompress.s3, s3_access.bucket_name, archive_object.key)
    folders = read_decompressed_archive(archive)
    reconstruction = reference_infer(
        http_client, DECOMPRESS_MODEL, "int64_latent32_15", "output_sentinel2_10_bands_120", expected_codes,
        datatype="INT64",
    )
    check_reconstruction(folders, patches, reconstruction)
    # Georeferencing of the input patch survives: CRS and 10 m transform of its band files.
    with rasterio.open(SAMPLE_PATCHES / GEOREFERENCED_PATCH / f"{GEOREFERENCED_PATCH}_B04.tif") as source:
        assert folders[GEOREFERENCED_PATCH]["B04"].transform == source.transform
        assert rasterio.crs.CRS.from_wkt(folders[GEOREFERENCED_PATCH]["B04"].crs_wkt) == source.crs
    # The decompressed archive is again an input the Wrapper reads.
    items = list(read_tar_stream(io.BytesIO(archive), "round-trip", InputLimits()))
    assert [item.patch_id for item in items] == patches and all(isinstance(i, InputPatch) for i in items)


def test_safe_product_gives_tile_features_and_a_cfactor_mosaic(
    server: InferenceServer, http_client: Any, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    scene = _scene()
    _write_safe(tmp_path / "safe", scene)
    ssl = make_step("ssl-features", s3_access, kafka_broker, tmp_path)
    _upload_tree(ssl.s3, s3_access.bucket_name, tmp_path / "safe", "scenes/")
    tiles = {(i, j): reference_input(tile_bands(scene, i, j)) for i, j in KEPT_TILES}

    features = ssl.run(ssl.runtime(server.grpc_url), "scenes")

    assert features.status == "SUCCESS", features.reason
    check_announced(ssl, features)
    raw = json.loads(object_bytes(ssl.s3, s3_access.bucket_name, f"{features.output_folder}/{PRODUCT}.features.json"))
    assert [(entry["i"], entry["j"]) for entry in raw] == KEPT_TILES  # production's tile row/column
    assert [entry["patch_id"] for entry in raw] == [f"{PRODUCT}_{i}_{j}" for i, j in KEPT_TILES]
    expected = reference_infer(http_client, SSL_MODEL, "input_sentinel2_10_bands_120", "representation_2048",
                               np.stack([tiles[t] for t in KEPT_TILES]))
    np.testing.assert_allclose(np.array([entry["result"] for entry in raw], dtype=np.float32), expected,
                               rtol=1e-4, atol=1e-5)

    uc5 = make_step("uc5-cfactor", s3_access, kafka_broker, tmp_path)
    result = uc5.run(uc5.runtime(server.grpc_url), "scenes")

    assert result.status == "SUCCESS", result.reason
    check_announced(uc5, result)
    check_manifest(uc5, result)
    (mosaic_object,) = result.objects
    assert mosaic_object.key == f"{result.output_folder}/{PRODUCT}.tif"
    raster = read_geotiff(object_bytes(uc5.s3, s3_access.bucket_name, mosaic_object.key))
    # 2 x 3 tiles of 5 x 5 cells at 240 m; the two no-data tiles (0, 0) and (1, 2) stay nodata.
    assert raster.array.shape == (1, 10, 15) and raster.array.dtype == np.float32
    assert raster.nodata == -1.0 and raster.compression.upper() == "ZSTD"
    assert raster.transform == from_origin(ORIGIN_X, ORIGIN_Y, 240, 240)
    assert raster.band_descriptions == ("C-Factor",)
    assert raster.tags["product"] == "C-Factor" and raster.tags["created"] == EVENT_TIME.isoformat()
    assert (raster.tags["model"], raster.tags["model_version"]) == ("uc5-cfactor", "1")
    values = raster.array[0]
    for i in range(2):
        for j in range(3):
            cells = values[i * 5:(i + 1) * 5, j * 5:(j + 1) * 5]
            if (i, j) not in KEPT_TILES:
                assert (cells == -1.0).all()
                continue
            crops = tiles[(i, j)].reshape(10, 5, 24, 5, 24).transpose(1, 3, 0, 2, 4).reshape(25, 10, 24, 24)
            expected_cells = reference_infer(http_client, "uc5-cfactor", "input_sentinel2_10_bands_24", "c_factor",
                                             np.ascontiguousarray(crops)).reshape(5, 5)
            np.testing.assert_allclose(cells, expected_cells, rtol=1e-5, atol=1e-6)


def _era5_geotiff(path: Path, values: np.ndarray, nodata: float) -> bytes:
    with rasterio.open(
        path, "w", driver="GTiff", width=values.shape[-1], height=values.shape[-2], count=8, dtype="float32",
        crs="EPSG:4326", transform=from_origin(30.0, 20.0, 0.1, 0.1), nodata=nodata,
    ) as dataset:
        dataset.write(values.reshape(8, *values.shape[-2:]))
    return path.read_bytes()


def test_uc6_locust_reads_geotiff_and_npy_stacks(
    server: InferenceServer, http_client: Any, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    height, width = 40, 50  # 3 x 4 whole windows of 12 x 12; the last rows and columns are not covered
    values = np.empty((4, 2, height, width), dtype=np.float32)
    values[:, 0] = rng.gamma(0.4, 3.0, (4, height, width))  # precipitation, mm/day
    values[:, 1] = rng.normal(300.0, 6.0, (4, height, width))  # temperature, K
    nodata = -9999.0
    with_gap = values.copy()
    with_gap[2, 1, 13, 30] = nodata  # window (1, 2) misses one cell
    uc6 = make_step("uc6-locust", s3_access, kafka_broker, tmp_path)
    uc6.s3.put_object(Bucket=s3_access.bucket_name, Key="era5/a-stack.tif",
                      Body=_era5_geotiff(tmp_path / "stack.tif", with_gap, nodata))
    buffer = io.BytesIO()
    np.save(buffer, values)
    uc6.s3.put_object(Bucket=s3_access.bucket_name, Key="era5/b-stack.npy", Body=buffer.getvalue())

    outcome = uc6.run(uc6.runtime(server.grpc_url), "era5")

    assert outcome.status == "SUCCESS", outcome.reason
    check_announced(uc6, outcome)
    check_manifest(uc6, outcome)
    assert [o.key for o in outcome.objects] == [f"{outcome.output_folder}/a-stack.tif", f"{outcome.output_folder}/b-stack.tif"]
    card = http_client.get_model_config("uc6-locust")["parameters"]
    mean = np.array([float(v) for v in card["card.band_mean"]["string_value"].split(",")], dtype=np.float32)
    std = np.array([float(v) for v in card["card.band_std"]["string_value"].split(",")], dtype=np.float32)
    normalised = (values - mean.reshape(1, 2, 1, 1)) / std.reshape(1, 2, 1, 1)
    windows = normalised[:, :, :36, :48].reshape(4, 2, 3, 12, 4, 12).transpose(2, 4, 0, 1, 3, 5).reshape(12, 4, 2, 12, 12)
    expected = reference_infer(http_client, "uc6-locust", "input", "probability", np.ascontiguousarray(windows)).reshape(3, 4)
    tif = read_geotiff(object_bytes(uc6.s3, s3_access.bucket_name, outcome.objects[0].key))
    npy = read_geotiff(object_bytes(uc6.s3, s3_access.bucket_name, outcome.objects[1].key))
    assert tif.array.shape == npy.array.shape == (1, 3, 4)
    assert tif.array[0, 1, 2] == -1.0  # the window with a missing cell is nodata
    mask = np.ones((3, 4), dtype=bool)
    mask[1, 2] = False
    np.testing.assert_allclose(tif.array[0][mask], expected[mask], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npy.array[0], expected, rtol=1e-5, atol=1e-6)
    assert tif.transform.almost_equals(from_origin(30.0, 20.0, 1.2, 1.2))  # 12 cells of 0.1 degree
    assert tif.tags["product"] == "Locust Suitability Index" and tif.nodata == -1.0
    assert npy.crs_wkt is None  # a bare array carries no georeferencing


def test_patch_folders_under_the_folder_form_one_input_over_http(
    server: InferenceServer, http_client: Any, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    ssl = make_step("ssl-features", s3_access, kafka_broker, tmp_path)
    for patch in (PLAIN_PATCH, GEOREFERENCED_PATCH):
        upload_patch_folder(ssl.s3, s3_access.bucket_name, "loose/batch-7/", patch)

    # Over tritonclient HTTP this time, one patch per request.
    runtime = ssl.runtime(server.http_url, inference_protocol="http", batch_size=1)
    outcome = ssl.run(runtime, "loose/batch-7")

    assert outcome.status == "SUCCESS", outcome.reason
    notifications = check_announced(ssl, outcome)
    # Patch folders are counted before they are read: progress shows their number.
    assert any(n["description"].startswith("Progress file 1/1 : 2/2 patches (100 %)") for n in notifications)
    features = read_features(object_bytes(ssl.s3, s3_access.bucket_name, f"{outcome.output_folder}/batch-7.features.npz"))
    assert features.patch_ids == tuple(sorted((PLAIN_PATCH, GEOREFERENCED_PATCH)))
    expected = reference_infer(http_client, SSL_MODEL, "input_sentinel2_10_bands_120", "representation_2048",
                               np.stack([sample_input(p) for p in features.patch_ids]))
    np.testing.assert_allclose(features.features, expected, rtol=1e-4, atol=1e-5)


def test_redelivery_is_a_duplicate_and_a_new_event_gets_its_own_run_folder(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    uc5 = make_step("uc5-cfactor", s3_access, kafka_broker, tmp_path)
    uc5.s3.put_object(Bucket=s3_access.bucket_name, Key="in/x.tar.gz",
                      Body=sample_tar_gz([GEOREFERENCED_PATCH, PLAIN_PATCH]))
    runtime = uc5.runtime(server.grpc_url)

    first = uc5.run(runtime, "in", event_id="partition:0/offset:7")
    assert first.status == "SUCCESS", first.reason
    keys = sorted(list_keys(uc5.s3, s3_access.bucket_name, "result-uc5-cfactor/"))
    snapshot = {key: object_bytes(uc5.s3, s3_access.bucket_name, key) for key in keys}
    # Independent patches get one raster each, in a folder named after the archive, in the run's attempt folder;
    # manifest and marker beside the run folder.
    assert first.output_folder.startswith(first.run_folder + "/a-")
    assert keys == sorted([
        first.run_folder + MANIFEST_SUFFIX,
        first.run_folder + ANNOUNCED_SUFFIX,
        f"{first.output_folder}/x/{GEOREFERENCED_PATCH}.tif",
        f"{first.output_folder}/x/{PLAIN_PATCH}.tif",
        f"{first.output_folder}/collection.json",  # the run folder's STAC: per-patch results, an Item per patch
        f"{first.output_folder}/x/{GEOREFERENCED_PATCH}.item.json",
        f"{first.output_folder}/x/{PLAIN_PATCH}.item.json",
    ])
    geo_item = json.loads(snapshot[f"{first.output_folder}/x/{GEOREFERENCED_PATCH}.item.json"])
    plain_item = json.loads(snapshot[f"{first.output_folder}/x/{PLAIN_PATCH}.item.json"])
    assert geo_item["id"] == f"x__{GEOREFERENCED_PATCH}" and geo_item["properties"]["proj:code"] == "EPSG:32629"
    assert geo_item["assets"]["tif"]["href"] == f"./{GEOREFERENCED_PATCH}.tif"
    assert geo_item["assets"]["tif"]["raster:bands"] == [{"data_type": "float32", "nodata": -1.0}]
    # The item's grid is the patch's (10 m, 120 x 120); the C-factor raster's own is 5 x 5 at 240 m.
    assert geo_item["properties"]["proj:shape"] == [120, 120]
    assert geo_item["assets"]["tif"]["proj:shape"] == [5, 5] and geo_item["assets"]["tif"]["proj:transform"][0] == 240
    assert geo_item["geometry"]["type"] == "Polygon" and plain_item["geometry"] is None
    assert first.run_folder.startswith(output_folder("result-uc5-cfactor", "in") + "/r-")
    georeferenced = read_geotiff(snapshot[f"{first.output_folder}/x/{GEOREFERENCED_PATCH}.tif"])
    with rasterio.open(SAMPLE_PATCHES / GEOREFERENCED_PATCH / f"{GEOREFERENCED_PATCH}_B02.tif") as source:
        assert georeferenced.transform == source.transform @ Affine.scale(24)
    assert georeferenced.array.shape == (1, 5, 5)

    # The same event again: recognised from its marker, nothing processed, written or sent.
    again = uc5.run(runtime, "in", event_id="partition:0/offset:7")
    assert (again.status, again.earlier, again.output_folder) == ("DUPLICATE", "announced", first.output_folder)
    assert sorted(list_keys(uc5.s3, s3_access.bucket_name, "result-uc5-cfactor/")) == keys

    # A new event for the same input: its own run folder, the same result bytes; the first run is untouched.
    second = uc5.run(runtime, "in", event_id="partition:0/offset:8")
    assert second.status == "SUCCESS", second.reason
    assert second.run_folder != first.run_folder
    assert second.run_folder.rsplit("/", 1)[0] == first.run_folder.rsplit("/", 1)[0]
    for key in keys:
        assert object_bytes(uc5.s3, s3_access.bucket_name, key) == snapshot[key], key
        if key.startswith(first.output_folder + "/"):
            twin = second.output_folder + key[len(first.output_folder):]
            if is_stac_document(key):  # the same description, of another run (its id)
                first_run, second_run = (first.run_folder.rsplit("/", 1)[1], second.run_folder.rsplit("/", 1)[1])
                assert object_bytes(uc5.s3, s3_access.bucket_name, twin) == snapshot[key].replace(
                    first_run.encode(), second_run.encode()), twin
                continue
            assert object_bytes(uc5.s3, s3_access.bucket_name, twin) == snapshot[key], twin
    announcements = uc5.records([uc5.topic_out], until=lambda r: len(r) >= 2, timeout_s=10)
    assert [r["value"]["S3_bucket_desc"]["folder"] for r in announcements] == [first.output_folder,
                                                                              second.output_folder]
    assert [n["status"] for n in uc5.notifications(final=False)].count("START") == 2


def test_a_unit_past_the_codes_file_limit_is_split_and_decompress_reads_every_part(
    server: InferenceServer, http_client: Any, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    patches = sample_patch_names()[3:6]
    compress = make_step("compress", s3_access, kafka_broker, tmp_path)
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key="in/three.tar.gz", Body=sample_tar_gz(patches))

    outcome = compress.run(compress.runtime(server.grpc_url, codes_patches_per_file=2), "in")

    assert outcome.status == "SUCCESS", outcome.reason
    assert [(o.key, o.patches) for o in outcome.objects] == [
        (f"{outcome.output_folder}/three.part-0001.codes", 2), (f"{outcome.output_folder}/three.part-0002.codes", 1)]
    prior = card_prior(http_client, COMPRESS_MODEL)
    parts = [read_compressed(object_bytes(compress.s3, s3_access.bucket_name, o.key), prior) for o in outcome.objects]
    assert [p.patch_id for part in parts for p in part.patches] == patches
    manifest = check_manifest(compress, outcome)
    compression = manifest["stats"]["per_input"][0]["compression"]
    assert compression["parts"] == 2 and compression["patches"] == 3
    assert compression["file_bytes"] == sum(o.size for o in outcome.objects)

    decompress = make_step("decompress", s3_access, kafka_broker, tmp_path)
    result = decompress.run(decompress.runtime(server.grpc_url), outcome.output_folder)

    assert result.status == "SUCCESS", result.reason
    assert result.patches == 3
    archives = [read_decompressed_archive(object_bytes(decompress.s3, s3_access.bucket_name, o.key))
                for o in result.objects]
    assert [o.key.rsplit("/", 1)[1] for o in result.objects] == ["three.part-0001.tar.gz", "three.part-0002.tar.gz"]
    assert sorted(name for archive in archives for name in archive) == sorted(patches)


# ---------------------------------------------------------------------------------------------------------------
# Rate control per workflow (meta_information.compression) with a compressor whose card carries an entropy prior


@pytest.fixture(scope="module")
def prior_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    """Our inference server on the two compression models with ``card.entropy_prior`` on their cards: the exported
    cards' own when they carry one, else the synthetic test prior added to copies of their configs (the ONNX files
    are linked, not copied)."""
    root = tmp_path_factory.mktemp("prior-repository")
    for model in (COMPRESS_MODEL, DECOMPRESS_MODEL):
        source = MODEL_REPOSITORY / model
        target = root / model
        (target / "1").mkdir(parents=True)
        for onnx in (source / "1").iterdir():
            (target / "1" / onnx.name).symlink_to(onnx)
        shutil.copy(source / "README.md", target / "README.md")
        config = (source / "config.pbtxt").read_text()
        if "card.entropy_prior" not in config:
            config += ('parameters {\n  key: "card.entropy_prior"\n  value: { string_value: "'
                       + synthetic_prior().to_text() + '" }\n}\n')
        (target / "config.pbtxt").write_text(config)
    started = InferenceServer(root / "server.log", models=[COMPRESS_MODEL, DECOMPRESS_MODEL], repository=root).start()
    try:
        yield started
    finally:
        started.stop()


def test_workflow_compression_field_sets_the_operating_point_and_decompress_refuses_foreign_codes(
    prior_server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    client = httpclient.InferenceServerClient(prior_server.http_url, network_timeout=300.0)
    prior = card_prior(client, COMPRESS_MODEL)
    decompressor_prior = card_prior(client, DECOMPRESS_MODEL)
    assert prior is not None and decompressor_prior is not None and decompressor_prior.sha256 == prior.sha256
    patches = [GEOREFERENCED_PATCH, PLAIN_PATCH]
    reference_codes = reference_infer(client, COMPRESS_MODEL, "input_sentinel2_10_bands_120", "int64_latent32_15",
                                      np.stack([sample_input(p) for p in patches]))
    client.close()
    compress = make_step("compress", s3_access, kafka_broker, tmp_path)
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key="in/pair.tar.gz", Body=sample_tar_gz(patches))
    runtime = compress.runtime(prior_server.grpc_url)

    # A fixed operating point: 3 levels at quantiser scale 4.
    meta = {"request": "rate", "compression": {"levels": 3, "quantiser_scale": 4}}
    outcome = compress.run(runtime, "in", meta=meta)
    assert outcome.status == "SUCCESS", outcome.reason
    check_announced(compress, outcome, meta)  # the field travels on with the workflow's meta_information
    manifest = check_manifest(compress, outcome)
    data = object_bytes(compress.s3, s3_access.bucket_name, outcome.objects[0].key)
    header = read_compressed_header(data)
    assert (header["format_version"], header["codec"]) == (2, "transform-codes/1")
    assert (header["levels"], header["quantiser_scale"], header["prior_sha256"]) == (3, 4, prior.sha256)
    assert header["requested"] == {"levels": 3, "quantiser_scale": 4} and "target_met" not in header
    decoded = read_compressed(data, prior)
    np.testing.assert_array_equal(decoded.codes, requantised_codes(reference_codes, 4, 3))
    stats = manifest["stats"]["per_input"][0]["compression"]
    assert (stats["format_version"], stats["levels"], stats["quantiser_scale"]) == (2, 3, 4)
    assert stats["requested"] == {"levels": 3, "quantiser_scale": 4}
    assert stats["estimated_rms_percent"] == pytest.approx(header["estimated_rms_percent"])
    assert stats["bits_per_pixel"] == pytest.approx(len(data) * 8 / (2 * PIXELS_PER_PATCH))

    # A target bits per pixel every scale meets: the finest scale, the served codes exactly.
    loose = {"compression": {"target_bpp": 500.0}}
    exact = compress.run(runtime, "in", meta=loose)
    assert exact.status == "SUCCESS", exact.reason
    exact_data = object_bytes(compress.s3, s3_access.bucket_name, exact.objects[0].key)
    exact_header = read_compressed_header(exact_data)
    assert exact_header["requested"] == {"levels": 8, "target_bpp": 500.0}  # levels: the deployment's default
    assert (exact_header["quantiser_scale"], exact_header["target_met"]) == (1, True)
    np.testing.assert_array_equal(read_compressed(exact_data, prior).codes, reference_codes)
    exact_stats = check_manifest(compress, exact)["stats"]["per_input"][0]["compression"]
    assert exact_stats["target_met"] is True and exact_stats["bits_per_pixel"] <= 500.0

    # A target RMS error, met file by file: one patch per part, each part's scale listed in the manifest.
    split = compress.run(compress.runtime(prior_server.grpc_url, codes_patches_per_file=1), "in",
                         meta={"compression": {"levels": 2, "target_rms_percent": 50.0}})
    assert split.status == "SUCCESS", split.reason
    part_headers = [read_compressed_header(object_bytes(compress.s3, s3_access.bucket_name, o.key))
                    for o in split.objects]
    assert [h["requested"] for h in part_headers] == [{"levels": 2, "target_rms_percent": 50.0}] * 2
    for part in part_headers:
        assert part["levels"] == 2
        assert part["target_met"] == (part["estimated_rms_percent"] <= 50.0)
    split_stats = check_manifest(compress, split)["stats"]["per_input"][0]["compression"]
    assert split_stats["parts"] == 2
    assert split_stats["quantiser_scale"] == [h["quantiser_scale"] for h in part_headers]
    assert split_stats["target_met"] == all(h["target_met"] for h in part_headers)
    assert split_stats["estimated_rms_percent"] == pytest.approx(
        np.sqrt(np.mean([h["estimated_rms_percent"] ** 2 for h in part_headers])), rel=1e-5)

    # A malformed field fails the step for good, naming the field, before anything is written.
    bad = compress.run(runtime, "in", meta={"compression": {"levels": 3, "target_bpp": -1}})
    assert bad.status == "CRITICAL"
    assert "meta_information.compression is invalid" in bad.reason and "compression.target_bpp" in bad.reason
    dead = compress.records([compress.dlq_topic], until=lambda r: len(r) >= 1)
    assert len(dead) == 1 and "compression.target_bpp" in json.dumps(dead[0]["value"])
    assert not list_keys(compress.s3, s3_access.bucket_name, bad.output_folder + "/")
    assert [n for n in compress.notifications(final=False) if n["status"] == "CRITICAL"]

    # Decompress reads the operating point from the header; codes of another prior or of format 1 are refused.
    folder = outcome.output_folder
    scale = BandScale.from_json(header["band_scale"])
    metadata = [PatchMetadata(patch_id=p) for p in patches]
    foreign = write_transform_codes(reference_codes, OperatingPoint(8, quantiser_scale=1), synthetic_prior(seed=1),
                                    metadata, scale, COMPRESS_MODEL, "1")
    residual = write_compressed(reference_codes, 8, metadata, scale, COMPRESS_MODEL, "1")
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key=f"{folder}/foreign.codes", Body=foreign.file.data)
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key=f"{folder}/residual.codes", Body=residual.file.data)
    decompress = make_step("decompress", s3_access, kafka_broker, tmp_path)
    result = decompress.run(decompress.runtime(prior_server.grpc_url), folder)
    assert result.status == "SUCCESS", result.reason
    assert result.patches == 2 and [o.key.rsplit("/", 1)[1] for o in result.objects] == ["pair.tar.gz"]
    reasons = {r.source.rsplit("/", 1)[1]: r.reason for r in result.rejections}
    assert sorted(reasons) == ["foreign.codes", "residual.codes"]
    assert "coded with entropy prior" in reasons["foreign.codes"] and prior.sha256[:12] in reasons["foreign.codes"]
    assert "format 1 (residual-VQ codes)" in reasons["residual.codes"]
    decompress_stats = check_manifest(decompress, result)["stats"]["per_input"][0]
    assert (decompress_stats["format_version"], decompress_stats["levels"], decompress_stats["quantiser_scale"]) == (2, 3, 4)
    assert sorted(read_decompressed_archive(object_bytes(decompress.s3, s3_access.bucket_name,
                                                         result.objects[0].key))) == sorted(patches)
