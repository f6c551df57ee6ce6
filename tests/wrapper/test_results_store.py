"""Run folders, markers and uploads against a real S3-protocol server (moto); spooled writers against in-memory ones."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest

from services.wrapper.outputs.types import ResultObject
from services.wrapper.inputs import S3Access, make_s3_client
from services.wrapper.outputs.features import (
    stream_features_json,
    stream_features_npz,
    write_features_json,
    write_features_npz,
)
from services.wrapper.outputs.types import OutputFile, PatchMetadata
from services.wrapper.results import (
    MULTIPART_THRESHOLD,
    ObjectExists,
    ResultStore,
    ResultWriteError,
    create_only,
    read_json_object,
    run_id,
)
from services.wrapper.spool import ArraySpool, spooled_output
from wrapper_stack import free_port


def test_run_ids_identify_a_delivery() -> None:
    args = ("json-config-x", "/apis/v1/namespaces/ns/kafkasources/s#t", "partition:0/offset:7", "2026-01-01T00:00:00Z")
    first = run_id(*args)
    assert first == run_id(*args) and first.startswith("r-") and len(first) == 18
    assert run_id(*args[:3], "2026-01-01T00:00:01Z") != first  # a re-created topic re-uses offsets, not times
    assert run_id(args[0], args[1], "partition:0/offset:8", args[3]) != first
    assert run_id("json-config-y", *args[1:]) != first
    assert run_id(args[0], args[1], "", args[3]) != run_id(args[0], args[1], "", args[3])  # no id: random


def test_the_manifest_write_is_create_only(s3_access: S3Access) -> None:
    client = make_s3_client(s3_access)
    run = "result-x/in-1234abcd/r-0123456789abcdef"
    store = ResultStore(client, s3_access.bucket_name, f"{run}/a-01234567-89abcdef")
    key = store.finish({"patches": 1}, run)
    assert key == run + ".manifest.json"  # beside the run folder, whichever attempt writes it
    other_attempt = ResultStore(client, s3_access.bucket_name, f"{run}/a-01234567-00000000")
    with pytest.raises(ObjectExists):
        other_attempt.finish({"patches": 2}, run)
    assert read_json_object(client, s3_access.bucket_name, key) == {"patches": 1}  # the first one stays
    assert read_json_object(client, s3_access.bucket_name, key + ".absent") is None


def test_an_unreachable_store_is_a_transient_failure(s3_access: S3Access) -> None:
    dead = make_s3_client(s3_access.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}",
                                                       "max_attempts": 1}))
    with pytest.raises(ResultWriteError) as failure:
        read_json_object(dead, s3_access.bucket_name, "x.json")
    assert failure.value.transient
    with pytest.raises(ResultWriteError) as failure:
        create_only(dead, s3_access.bucket_name, "x.json", b"{}", "the manifest")
    assert failure.value.transient


def test_a_large_spooled_result_is_uploaded_in_parts(s3_access: S3Access, tmp_path: Path) -> None:
    client = make_s3_client(s3_access)
    block = np.random.default_rng(3).bytes(1024 * 1024)
    with spooled_output(str(tmp_path), ".bin", "application/octet-stream") as (target, made):
        for _ in range(MULTIPART_THRESHOLD // len(block) + 2):
            target.write(block)
    spooled = made[0]
    assert spooled.path is not None and spooled.size == MULTIPART_THRESHOLD + 2 * len(block)
    store = ResultStore(client, s3_access.bucket_name, "result-x/run")
    written = store.put(ResultObject("result-x/run/big.bin", spooled, 1), "in/big")

    head = client.head_object(Bucket=s3_access.bucket_name, Key="result-x/run/big.bin")
    assert head["ContentLength"] == spooled.size == written.size
    assert "-" in head["ETag"]  # a multipart upload's ETag: <md5 of part md5s>-<parts>
    body = client.get_object(Bucket=s3_access.bucket_name, Key="result-x/run/big.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == written.sha256 == spooled.sha256
    os.unlink(spooled.path)


def test_spooled_features_are_the_bytes_of_the_in_memory_writers(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    features = rng.standard_normal((700, 2048)).astype(np.float32)
    patches = [PatchMetadata(f"patch-{n}", i=n // 30, j=n % 30) for n in range(700)]
    spool = ArraySpool(str(tmp_path), np.float32)
    for start in range(0, 700, 48):  # batches as they come back
        spool.append(features[start:start + 48], patches[start:start + 48])
    json_out, npz_out = io.BytesIO(), io.BytesIO()
    stream_features_json(json_out, spool.chunks(size=100), spool.items)
    stream_features_npz(npz_out, spool.chunks(size=100), len(spool), spool.items, "m", "1")
    spool.close()
    assert not Path(spool.path).exists()
    assert json_out.getvalue() == write_features_json(features, patches).data
    assert npz_out.getvalue() == write_features_npz(features, patches, "m", "1").data


def test_an_in_memory_output_file_reports_its_size_and_hash() -> None:
    file = OutputFile(data=b"abc", content_type="text/plain", suffix=".txt")
    assert (file.size, file.sha256) == (3, hashlib.sha256(b"abc").hexdigest())
    assert file.read_bytes() == b"abc"
