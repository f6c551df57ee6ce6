"""Residual-VQ codes (``.codes`` format 1) end to end through served models and the two Wrapper tasks, served by card.

Real parts: our inference server (``python -m services.inference.cli``) on a temporary model repository, moto S3,
tansu Kafka, ``run_step`` of the compress and decompress Wrappers with the model chosen by configuration only
(``EOML_WRAPPER_MODEL_NAME``: the ``compress-rvq`` / ``decompress-rvq`` deployments).

Model pairs: an "externally exported" pair (``rvq_onnx_fixture``: ONNX built with the ``onnx`` package from seeded
numpy weights, card ``codec: residual-vq/1``, dropped into the repository as a model owner would), and the project's
own export ``Bigearth-net-rvq-compress``/``-decompress`` when ``model_repository`` holds it (``make models``).
Expected values come from the served models over tritonclient HTTP (the Wrapper uses gRPC) on patches read with
tifffile and standardised with ``services.core.sentinel2``'s statistics, not the card the Wrapper reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import rasterio
import tritonclient.http as httpclient

import rvq_onnx_fixture
from services.core.model_card import CardError, check_model_directory
from services.core.rvq_prior import ResidualVqPrior, fit_rvq_prior
from services.wrapper.outputs import read_compressed, read_compressed_header, read_decompressed_archive
from services.wrapper.outputs import write_compressed, write_transform_codes
from services.wrapper.outputs.compressed import PIXELS_PER_PATCH, OperatingPoint, keep_levels
from services.wrapper.outputs.residual_prior_codes import write_residual_prior_codes
from services.wrapper.outputs.types import BandScale, PatchMetadata
from outputs_test_data import GEOREFERENCED_PATCH, PLAIN_PATCH, SECOND_GEOREFERENCED_PATCH, synthetic_prior
from test_pipeline_tasks import (  # noqa: F401 - close_step_runtimes is an autouse fixture
    BANDS,
    check_announced,
    check_manifest,
    check_reconstruction,
    close_step_runtimes,
    make_step,
    reference_infer,
    sample_input,
)
from wrapper_input_data import SAMPLE_PATCHES, sample_patch_names, sample_tar_gz
from wrapper_stack import MODEL_REPOSITORY, InferenceServer, list_keys, object_bytes

EXTERNAL = ("external-rvq-compress", "external-rvq-decompress")
# The same weights with an RVQ prior on both cards (per-level index frequencies of the fixture's codes of training
# patches): files coded under it (format 3) when smaller than with their own histograms (format 1).
WITH_PRIOR = ("external-rvq-prior-compress", "external-rvq-prior-decompress")
EXPORTED = ("Bigearth-net-rvq-compress", "Bigearth-net-rvq-decompress")  # make models (models/specs.py)
NO_PRIOR_TRANSFORM = "external-transform-without-prior"  # a card that contradicts itself
EXPORTED_PRESENT = all((MODEL_REPOSITORY / name / "config.pbtxt").is_file() for name in EXPORTED)
PAIRS = [
    pytest.param(EXTERNAL, id="external-onnx-fixture"),
    pytest.param(EXPORTED, id="exported", marks=pytest.mark.skipif(
        not EXPORTED_PRESENT, reason=f"{EXPORTED[0]}/{EXPORTED[1]} not in model_repository (make models exports them)")),
]
PATCHES = [GEOREFERENCED_PATCH, PLAIN_PATCH, SECOND_GEOREFERENCED_PATCH]
CODES_INPUT, CODES_OUTPUT = "int64_latent32_15", "output_sentinel2_10_bands_120"

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def training_prior() -> ResidualVqPrior:
    """The prior a model owner fits on training codes: here the fixture's codes of sample patches not tested below."""
    names = [name for name in sample_patch_names() if name not in PATCHES][:12]
    inputs = np.stack([sample_input(name) for name in names]).astype(np.float64)
    return fit_rvq_prior(rvq_onnx_fixture.numpy_codes(rvq_onnx_fixture.RvqWeights.seeded(2026), inputs),
                         source="external fixture codes of 12 sample patches")


@pytest.fixture(scope="module")
def rvq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    """One server on a temporary repository: the external pair, a compressor whose card says transform-codes/1
    without a prior, and (linked) the project's own RVQ export when it exists."""
    root = tmp_path_factory.mktemp("rvq-repository")
    rvq_onnx_fixture.write_pair(root, *EXTERNAL)
    rvq_onnx_fixture.write_pair(root, *WITH_PRIOR, entropy_prior=training_prior().to_text())
    weights = rvq_onnx_fixture.RvqWeights.seeded(7)
    rvq_onnx_fixture.write_model(root, NO_PRIOR_TRANSFORM, rvq_onnx_fixture.compressor(weights), "compress",
                                 codec="transform-codes/1")
    models = [*EXTERNAL, *WITH_PRIOR, NO_PRIOR_TRANSFORM]
    if EXPORTED_PRESENT:
        for name in EXPORTED:
            (root / name).symlink_to(MODEL_REPOSITORY / name, target_is_directory=True)
        models += EXPORTED
    started = InferenceServer(root / "server.log", models=models, repository=root).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def rvq_client(rvq_server: InferenceServer) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(rvq_server.http_url, network_timeout=300.0)
    yield client
    client.close()


def served_codes(client: httpclient.InferenceServerClient, model: str, patches: list[str]) -> np.ndarray:
    return reference_infer(client, model, "input_sentinel2_10_bands_120", CODES_INPUT,
                           np.stack([sample_input(p) for p in patches]))


@pytest.mark.parametrize("pair", PAIRS)
def test_residual_vq_codes_round_trip_through_the_served_models_and_both_wrappers(
    pair: tuple[str, str], rvq_server: InferenceServer, rvq_client: Any, s3_access: Any, kafka_broker: Any,
    tmp_path: Path,
) -> None:
    compress_model, decompress_model = pair
    compress = make_step("compress", s3_access, kafka_broker, tmp_path)
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key="in/three.tar.gz", Body=sample_tar_gz(PATCHES))

    outcome = compress.run(compress.runtime(rvq_server.grpc_url, model_name=compress_model), "in")

    assert outcome.status == "SUCCESS", outcome.reason
    notifications = check_announced(compress, outcome)
    manifest = check_manifest(compress, outcome)
    (codes_object,) = outcome.objects
    data = object_bytes(compress.s3, s3_access.bucket_name, codes_object.key)
    header = read_compressed_header(data)
    # Format 1, its codec named in the header, written by the model the deployment was configured with.
    assert (header["format_version"], header["codec"], header["levels"]) == (1, "residual-vq/1", 8)
    assert header["model_name"] == compress_model == manifest["model"]["name"]
    decoded = read_compressed(data)  # no prior: format 1 carries its own histograms
    reference = served_codes(rvq_client, compress_model, PATCHES)
    # Bit-exact through the entropy coder: the file holds the served codebook indices of all 8 levels.
    np.testing.assert_array_equal(decoded.codes, reference)
    assert reference.min() >= 0 and reference.max() <= 9999
    assert [p.patch_id for p in decoded.patches] == PATCHES and decoded.band_scale.bands == BANDS
    stats = manifest["stats"]["per_input"][0]["compression"]
    assert (stats["format_version"], stats["levels"], stats.get("quantiser_scale")) == (1, 8, None)
    bpp = len(data) * 8 / (len(PATCHES) * PIXELS_PER_PATCH)
    assert manifest["stats"]["bits_per_pixel"] == pytest.approx(bpp)
    assert f"{bpp:.3f} bits per pixel" in notifications[-1]["description"]

    decompress = make_step("decompress", s3_access, kafka_broker, tmp_path)
    result = decompress.run(decompress.runtime(rvq_server.grpc_url, model_name=decompress_model),
                            outcome.output_folder)

    assert result.status == "SUCCESS", result.reason
    check_announced(decompress, result)
    decompress_stats = check_manifest(decompress, result)["stats"]["per_input"][0]
    assert (decompress_stats["format_version"], decompress_stats["levels"]) == (1, 8)
    assert decompress_stats["codes_model"] == compress_model
    (archive_object,) = result.objects
    folders = read_decompressed_archive(object_bytes(decompress.s3, s3_access.bucket_name, archive_object.key))
    reconstruction = reference_infer(rvq_client, decompress_model, CODES_INPUT, CODES_OUTPUT, reference,
                                     datatype="INT64")
    check_reconstruction(folders, PATCHES, reconstruction)
    # Georeferencing of each georeferenced input patch survives: CRS and 10 m transform of its band files.
    for patch in (GEOREFERENCED_PATCH, SECOND_GEOREFERENCED_PATCH):
        with rasterio.open(SAMPLE_PATCHES / patch / f"{patch}_B04.tif") as source:
            assert folders[patch]["B04"].transform == source.transform
            assert rasterio.crs.CRS.from_wkt(folders[patch]["B04"].crs_wkt) == source.crs


@pytest.mark.parametrize("pair", PAIRS)
def test_a_residual_vq_deployment_keeps_levels_refuses_rates_and_foreign_codes(
    pair: tuple[str, str], rvq_server: InferenceServer, rvq_client: Any, s3_access: Any, kafka_broker: Any,
    tmp_path: Path,
) -> None:
    compress_model, decompress_model = pair
    patches = [GEOREFERENCED_PATCH]
    compress = make_step("compress", s3_access, kafka_broker, tmp_path)
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key="in/one.tar.gz", Body=sample_tar_gz(patches))
    runtime = compress.runtime(rvq_server.grpc_url, model_name=compress_model)

    # meta_information.compression.levels keeps the first levels; the decompressor gets -1 in the others.
    outcome = compress.run(runtime, "in", meta={"compression": {"levels": 3}})
    assert outcome.status == "SUCCESS", outcome.reason
    data = object_bytes(compress.s3, s3_access.bucket_name, outcome.objects[0].key)
    assert (read_compressed_header(data)["codec"], read_compressed_header(data)["levels"]) == ("residual-vq/1", 3)
    reference = served_codes(rvq_client, compress_model, patches)
    kept = keep_levels(reference, 3)
    np.testing.assert_array_equal(read_compressed(data).codes, kept)

    # A rate or a target needs transform codes: refused for good, naming the codec, nothing written.
    bad = compress.run(runtime, "in", meta={"compression": {"target_bpp": 2.0}})
    assert bad.status == "CRITICAL"
    assert "codec transform-codes/1" in bad.reason and "is codec residual-vq/1" in bad.reason
    assert not list_keys(compress.s3, s3_access.bucket_name, bad.output_folder + "/")

    # Transform codes (format 2) beside the RVQ file: refused with the reason, the RVQ file decoded.
    folder = outcome.output_folder
    scale = BandScale.from_json(read_compressed_header(data)["band_scale"])
    foreign = write_transform_codes(np.full((1, 60, 60, 8), 5000, dtype=np.int64), OperatingPoint(8, quantiser_scale=1),
                                    synthetic_prior(), [PatchMetadata(patch_id="x")], scale, "transform", "1")
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key=f"{folder}/transform.codes", Body=foreign.file.data)
    decompress = make_step("decompress", s3_access, kafka_broker, tmp_path)
    result = decompress.run(decompress.runtime(rvq_server.grpc_url, model_name=decompress_model), folder)
    assert result.status == "SUCCESS", result.reason
    [rejection] = result.rejections
    assert rejection.source.endswith("/transform.codes")
    assert "format 2 (transform codes" in rejection.reason and "decodes codec residual-vq/1" in rejection.reason
    folders = read_decompressed_archive(object_bytes(decompress.s3, s3_access.bucket_name, result.objects[0].key))
    check_reconstruction(folders, patches, reference_infer(rvq_client, decompress_model, CODES_INPUT, CODES_OUTPUT,
                                                           kept, datatype="INT64"))


def test_the_external_pair_is_served_by_card_alone_and_computes_what_its_weights_say(
    rvq_server: InferenceServer, rvq_client: Any, tmp_path: Path
) -> None:
    # The model owner's check before serving: the cards fit the tensors, the codec is the card's.
    root = Path(rvq_server.repository)
    assert check_model_directory(root / EXTERNAL[0]).codec == "residual-vq/1"
    assert check_model_directory(root / EXTERNAL[1]).task == "decompress"
    # The served graph is the numpy description of the fixture (another encoder than ours: nothing names it).
    patches = [GEOREFERENCED_PATCH, PLAIN_PATCH]
    inputs = np.stack([sample_input(p) for p in patches])
    expected = rvq_onnx_fixture.numpy_codes(rvq_onnx_fixture.RvqWeights.seeded(2026), inputs.astype(np.float64))
    served = served_codes(rvq_client, EXTERNAL[0], patches)
    assert np.mean(served == expected) > 0.999  # float32 graph vs float64 numpy: a rare near-tie may flip
    assert all(len(np.unique(served[..., level])) > 8 for level in range(8))  # every level is used


def test_a_card_saying_transform_codes_without_a_prior_is_refused_at_load(
    rvq_server: InferenceServer, s3_access: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    expected = "codec transform-codes/1 needs an entropy_prior"
    with pytest.raises(CardError, match=expected):
        check_model_directory(Path(rvq_server.repository) / NO_PRIOR_TRANSFORM)
    compress = make_step("compress", s3_access, kafka_broker, tmp_path)
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key="in/one.tar.gz", Body=sample_tar_gz([PLAIN_PATCH]))
    outcome = compress.run(compress.runtime(rvq_server.grpc_url, model_name=NO_PRIOR_TRANSFORM), "in")
    assert outcome.status != "SUCCESS"
    assert "Model does not fit the task" in outcome.reason and expected in outcome.reason, outcome.reason
    assert NO_PRIOR_TRANSFORM in outcome.reason
    written = [k for k in list_keys(compress.s3, s3_access.bucket_name, "") if k != "in/one.tar.gz"]
    assert written and all(key.endswith(".failed.json") for key in written)  # the failure record, no codes


def test_an_rvq_prior_on_the_card_never_costs_bits_and_only_its_decompressor_reads_its_files(
    rvq_server: InferenceServer, rvq_client: Any, s3_access: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    compress_model, decompress_model = WITH_PRIOR
    patches = [PLAIN_PATCH]
    compress = make_step("compress", s3_access, kafka_broker, tmp_path)
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key="in/one.tar.gz", Body=sample_tar_gz(patches))
    outcome = compress.run(compress.runtime(rvq_server.grpc_url, model_name=compress_model), "in")
    assert outcome.status == "SUCCESS", outcome.reason
    data = object_bytes(compress.s3, s3_access.bucket_name, outcome.objects[0].key)
    prior = training_prior()
    decoded = read_compressed(data, prior)
    reference = served_codes(rvq_client, compress_model, patches)
    np.testing.assert_array_equal(decoded.codes, reference)
    # The Wrapper wrote the smaller of the two files these codes make: its own histograms (format 1) or the card's
    # prior (format 3). (With the fixture's 64-code levels, a single patch's own histogram is the smaller.)
    own_histograms = write_compressed(reference, 8, decoded.patches, decoded.band_scale, compress_model, "1")
    with_prior = write_residual_prior_codes(reference, 8, prior, decoded.patches, decoded.band_scale, compress_model, "1")
    smaller = min(own_histograms, with_prior, key=lambda f: (len(f.file.data), f.stats.format_version))  # tie: 1
    assert data == smaller.file.data
    stats = check_manifest(compress, outcome)["stats"]["per_input"][0]["compression"]
    assert stats["format_version"] == smaller.stats.format_version

    # A format-3 file beside it: the decompressor with the same prior decodes both; one without (the plain
    # external pair) decodes the format-1 file, if that is what was written, and refuses the format-3 one.
    folder = outcome.output_folder
    compress.s3.put_object(Bucket=s3_access.bucket_name, Key=f"{folder}/prior.codes", Body=with_prior.file.data)
    decompress = make_step("decompress", s3_access, kafka_broker, tmp_path)
    result = decompress.run(decompress.runtime(rvq_server.grpc_url, model_name=decompress_model), folder)
    assert result.status == "SUCCESS", result.reason
    assert not result.rejections and len(result.objects) == 2
    per_input = check_manifest(decompress, result)["stats"]["per_input"]
    assert 3 in {entry["format_version"] for entry in per_input}
    reconstruction = reference_infer(rvq_client, decompress_model, CODES_INPUT, CODES_OUTPUT, reference,
                                     datatype="INT64")
    for archive in result.objects:
        folders = read_decompressed_archive(object_bytes(decompress.s3, s3_access.bucket_name, archive.key))
        check_reconstruction(folders, patches, reconstruction)
    plain = make_step("decompress", s3_access, kafka_broker, tmp_path)
    refused = plain.run(plain.runtime(rvq_server.grpc_url, model_name=EXTERNAL[1]), folder)
    reasons = {r.source.rsplit("/", 1)[1]: r.reason for r in refused.rejections}
    assert "prior.codes" in reasons
    assert "format 3 (residual-VQ codes under RVQ prior" in reasons["prior.codes"]
    assert "has no RVQ prior" in reasons["prior.codes"]
