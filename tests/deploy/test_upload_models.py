"""deploy/upload_models.py against a real S3-protocol server (moto on loopback): refuses unbuilt repositories,
uploads everything Triton needs, skips what is unchanged, deletes only when asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest

from deploy_test_support import REPO_ROOT
from deploy.upload_models import RepositoryNotBuilt, check_built, main, sync
from services.local_platform.infra import MotoS3Server

BUCKET = "eo-models"
CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
"""


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with MotoS3Server() as server:
        yield server.endpoint_url


@dataclass(frozen=True)
class Bucket:
    client: Any
    name: str

    def keys(self, prefix: str = "") -> set[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return {obj["Key"] for page in pages for obj in page.get("Contents", [])}

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)


@pytest.fixture()
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Bucket:
    """A fresh bucket per test. moto accepts any credentials; boto3 finds them where it finds real ones."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"{BUCKET}-{request.node.name.lower().replace('_', '-')[:40]}"
    client.create_bucket(Bucket=name)
    return Bucket(client, name)


def make_repository(root: Path, *, built: bool = True) -> Path:
    for name in ("alpha", "beta"):
        model = root / name
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(CONFIG.format(name=name), encoding="utf-8")
        if built:
            (model / "1" / "model.onnx").write_bytes(f"onnx bytes of {name}".encode())
    (root / "alpha" / "labels.txt").write_text("a\nb\n", encoding="utf-8")
    (root / "beta" / "1" / "model.onnx.data").write_bytes(b"external weights")
    (root / ".build-stamp").write_text("", encoding="utf-8")
    return root


def test_uploads_every_file_triton_needs_and_nothing_hidden(bucket: Bucket, tmp_path: Path) -> None:
    repository = make_repository(tmp_path / "repo")
    report = sync(bucket.client, repository, bucket.name, "model_repository")
    expected = {"model_repository/alpha/config.pbtxt", "model_repository/alpha/labels.txt",
                "model_repository/alpha/1/model.onnx", "model_repository/beta/config.pbtxt",
                "model_repository/beta/1/model.onnx", "model_repository/beta/1/model.onnx.data"}
    assert bucket.keys() == expected
    assert set(report.uploaded) == expected and report.unchanged == []
    body = bucket.read("model_repository/beta/1/model.onnx")
    assert body == b"onnx bytes of beta"


def test_a_second_sync_uploads_only_what_changed(bucket: Bucket, tmp_path: Path) -> None:
    repository = make_repository(tmp_path / "repo")
    sync(bucket.client, repository, bucket.name, "models/v1")
    again = sync(bucket.client, repository, bucket.name, "models/v1")
    assert again.uploaded == [] and len(again.unchanged) == 6
    (repository / "alpha" / "1" / "model.onnx").write_bytes(b"retrained")
    changed = sync(bucket.client, repository, bucket.name, "models/v1")
    assert changed.uploaded == ["models/v1/alpha/1/model.onnx"]
    assert bucket.read("models/v1/alpha/1/model.onnx") == b"retrained"


def test_stale_objects_are_deleted_only_when_asked(bucket: Bucket, tmp_path: Path) -> None:
    repository = make_repository(tmp_path / "repo")
    bucket.put("mr/gamma/1/model.onnx", b"old model")
    bucket.put("elsewhere/keep.txt", b"not ours")
    sync(bucket.client, repository, bucket.name, "mr")
    assert "mr/gamma/1/model.onnx" in bucket.keys()
    dry = sync(bucket.client, repository, bucket.name, "mr", delete=True, dry_run=True)
    assert dry.deleted == ["mr/gamma/1/model.onnx"] and "mr/gamma/1/model.onnx" in bucket.keys()
    report = sync(bucket.client, repository, bucket.name, "mr", delete=True)
    assert report.deleted == ["mr/gamma/1/model.onnx"]
    assert "mr/gamma/1/model.onnx" not in bucket.keys() and "elsewhere/keep.txt" in bucket.keys()


def test_refuses_a_repository_without_model_files(bucket: Bucket, tmp_path: Path) -> None:
    repository = make_repository(tmp_path / "repo", built=False)
    with pytest.raises(RepositoryNotBuilt, match="make models") as refused:
        sync(bucket.client, repository, bucket.name, "model_repository")
    assert "alpha" in str(refused.value) and "model.onnx" in str(refused.value)
    assert bucket.keys() == set()


def test_refuses_models_without_version_directories(tmp_path: Path) -> None:
    repository = make_repository(tmp_path / "repo")
    (tmp_path / "repo" / "gamma").mkdir()
    (tmp_path / "repo" / "gamma" / "config.pbtxt").write_text(CONFIG.format(name="gamma"), encoding="utf-8")
    with pytest.raises(RepositoryNotBuilt, match="gamma: no version directory"):
        check_built(repository)


def test_cli_reports_the_storage_uri_and_refuses_unbuilt_models(bucket: Bucket, s3_endpoint: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    built = make_repository(tmp_path / "built")
    common = ["--bucket", bucket.name, "--prefix", "model_repository", "--endpoint-url", s3_endpoint]
    assert main(["--repository", str(built), *common]) == 0
    output = capsys.readouterr()
    assert f"storageUri: s3://{bucket.name}/model_repository" in output.out
    assert "test-secret" not in output.out + output.err
    unbuilt = make_repository(tmp_path / "unbuilt", built=False)
    assert main(["--repository", str(unbuilt), *common]) == 1
    assert "refusing to upload" in capsys.readouterr().err


def test_the_project_repository_is_complete_once_built() -> None:
    # make test builds the models first (make models); this is what make upload-models would check.
    names = check_built(REPO_ROOT / "model_repository")
    assert {"Bigearth-net-ssl-label", "Bigearth-net-linear-label", "uc5-cfactor", "uc6-locust"} <= set(names)
