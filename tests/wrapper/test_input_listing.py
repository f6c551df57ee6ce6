"""Listing and planning a step's input: empty folders, pagination, unreachable S3, secrets kept out of errors."""

from __future__ import annotations

import socket
import threading

import pytest

from services.wrapper.inputs import (
    InputError,
    InputLimits,
    PatchFolderSource,
    S3Access,
    SafeGranuleSource,
    TarArchiveSource,
    make_s3_client,
    plan_input,
    read_input,
)
from services.wrapper.inputs.s3_listing import S3Client, list_objects
from wrapper_input_data import TEST_SECRET_ACCESS_KEY, sample_patch_names, sample_tar_gz, upload_patch_folder


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_empty_folder_is_a_clear_error(s3_access: S3Access, s3_client: S3Client) -> None:
    s3_client.put_object(Bucket=s3_access.bucket_name, Key="elsewhere/x.tar.gz", Body=b"")

    with pytest.raises(InputError, match="no input found under 'step-7/input'"):
        list(read_input(s3_access, "step-7/input"))


def test_folder_with_nothing_readable_names_what_it_found(s3_access: S3Access, s3_client: S3Client) -> None:
    s3_client.put_object(Bucket=s3_access.bucket_name, Key="in/notes.txt", Body=b"hello")
    s3_client.put_object(Bucket=s3_access.bucket_name, Key="in/loose_B02.tif", Body=b"no patch folder")

    with pytest.raises(InputError, match="no input found under 'in'.*2 objects.*'in/loose_B02.tif'"):
        plan_input(s3_client, s3_access.bucket_name, "in", InputLimits())


def test_plan_sorts_mixed_layouts_in_key_order(s3_access: S3Access, s3_client: S3Client) -> None:
    bucket = s3_access.bucket_name
    names = sample_patch_names()[:2]
    s3_client.put_object(Bucket=bucket, Key="in/z/archive.tar.gz", Body=sample_tar_gz(names[:1]))
    upload_patch_folder(s3_client, bucket, "in/m/", names[1])
    granule = "in/P.SAFE/GRANULE/L2A_T33UUP/IMG_DATA"
    s3_client.put_object(Bucket=bucket, Key=f"{granule}/R10m/T33UUP_B02_10m.jp2", Body=b"x")
    s3_client.put_object(Bucket=bucket, Key=f"{granule}/R20m/T33UUP_B02_20m.jp2", Body=b"x")  # not needed at 20 m
    s3_client.put_object(Bucket=bucket, Key="in/P.SAFE/manifest.safe", Body=b"x")

    plan = plan_input(s3_client, bucket, "/in/", InputLimits())

    kinds = [type(source) for source in plan.sources]
    assert kinds == [SafeGranuleSource, PatchFolderSource, TarArchiveSource]
    safe = plan.sources[0]
    assert isinstance(safe, SafeGranuleSource)
    assert safe.tile_id_prefix == "P" and list(safe.band_objects) == ["B02"]
    assert "B12" in safe.missing_bands
    assert plan.listed_objects == 1 + 13 + 3
    assert plan.ignored_objects == 1 + 2  # labels JSON, the 20 m B02, the manifest


def test_filename_narrows_the_input_to_one_object(s3_access: S3Access, s3_client: S3Client) -> None:
    names = sample_patch_names()[:2]
    s3_client.put_object(Bucket=s3_access.bucket_name, Key="in/one.tar.gz", Body=sample_tar_gz(names[:1]))
    s3_client.put_object(Bucket=s3_access.bucket_name, Key="in/one.tar.gz.bak/other.tar.gz", Body=b"")
    s3_client.put_object(Bucket=s3_access.bucket_name, Key="in/two.tar.gz", Body=sample_tar_gz(names[1:]))

    items = list(read_input(s3_access, "in", filename="two.tar.gz"))

    assert [(item.source, item.patch_id) for item in items] == [("in/two.tar.gz", names[1])]


def test_listing_follows_pagination(s3_access: S3Access, s3_client: S3Client) -> None:
    for name in sample_patch_names()[:3]:
        upload_patch_folder(s3_client, s3_access.bucket_name, "in/", name)
    paginator = s3_client.get_paginator("list_objects_v2")
    pages = list(paginator.paginate(Bucket=s3_access.bucket_name, Prefix="in/", PaginationConfig={"PageSize": 5}))
    assert len(pages) > 1  # the server really pages at this size

    keys = [obj.key for obj in list_objects(s3_client, s3_access.bucket_name, "in/", InputLimits(), page_size=5)]

    assert len(keys) == 3 * 13
    assert keys == sorted(keys)


def test_listing_limit_is_an_input_error(s3_access: S3Access, s3_client: S3Client) -> None:
    upload_patch_folder(s3_client, s3_access.bucket_name, "in/", sample_patch_names()[0])

    with pytest.raises(InputError, match="max_listed_objects"):
        plan_input(s3_client, s3_access.bucket_name, "in", InputLimits(max_listed_objects=10))


def test_missing_bucket_is_a_clear_error(s3_access: S3Access) -> None:
    access = s3_access.model_copy(update={"bucket_name": "no-such-bucket-here"})

    with pytest.raises(InputError, match="'no-such-bucket-here' does not exist"):
        list(read_input(access, "in"))


def test_unreachable_s3_fails_after_bounded_retries_without_showing_secrets() -> None:
    access = S3Access(
        bucket_name="workflow",
        aws_access_key_id="AKIAUNREACHABLE",
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        max_attempts=2,
        connect_timeout_s=2,
    )
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            list(read_input(access, "in"))
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=120)  # a guard against hanging, not a speed check

    assert not worker.is_alive(), "reading from an unreachable S3 did not end"
    assert len(outcome) == 1 and isinstance(outcome[0], InputError)
    message = str(outcome[0])
    assert "unreachable" in message and "after 2 attempts" in message and access.endpoint_url in message
    assert TEST_SECRET_ACCESS_KEY not in message
    assert TEST_SECRET_ACCESS_KEY not in repr(access)


def test_access_is_built_from_the_workflow_contract(moto_endpoint: str) -> None:
    from services.core.contracts import S3Bucket

    bucket = S3Bucket.model_validate(
        {
            "aws_access_key_id": "AKIACONTRACT",
            "aws_secret_access_key": TEST_SECRET_ACCESS_KEY,
            "s3-bucket-name": "workflow-bucket",
            "endpoint_url": moto_endpoint,
        }
    )

    access = S3Access.from_contract(bucket, max_attempts=1)

    assert (access.bucket_name, access.endpoint_url, access.max_attempts) == ("workflow-bucket", moto_endpoint, 1)
    assert access.aws_secret_access_key.get_secret_value() == TEST_SECRET_ACCESS_KEY
    assert TEST_SECRET_ACCESS_KEY not in repr(access) and TEST_SECRET_ACCESS_KEY not in str(access.model_dump())
    make_s3_client(access).create_bucket(Bucket="workflow-bucket")
    with pytest.raises(InputError, match="no input found"):
        list(read_input(access, "anything"))


def test_retries_are_bounded_by_max_attempts() -> None:
    # A real endpoint that accepts each connection and hangs up at once: every try reaches it, so it counts them.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    connections = 0
    stop = threading.Event()

    def hang_up() -> None:
        nonlocal connections
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            connections += 1
            connection.close()

    server = threading.Thread(target=hang_up, daemon=True)
    server.start()
    access = S3Access(
        bucket_name="workflow",
        aws_access_key_id="AKIAHANGUP",
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        endpoint_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
        max_attempts=3,
    )
    try:
        with pytest.raises(InputError, match="unreachable.*after 3 attempts"):
            plan_input(make_s3_client(access), access.bucket_name, "in", InputLimits())
    finally:
        stop.set()
        server.join()
        listener.close()

    assert connections == 3


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("in/P_1/P_1_B8A.tif", ("in/P_1", "P_1", "B8A")),
        ("P/P_B12.tiff", ("P", "P", "B12")),
        ("in/P/P_B10.tif", None),  # L2A has no B10
        ("in/P/Q_B02.tif", None),  # file not named after its folder
        ("P_B02.tif", None),  # no patch folder
        ("in/P/P_labels_metadata.json", None),
    ],
)
def test_band_file_paths(path: str, expected: tuple[str, str, str] | None) -> None:
    from services.wrapper.inputs.band_files import parse_band_file_path

    parsed = parse_band_file_path(path)

    assert (None if parsed is None else (parsed.patch_dir, parsed.patch_name, parsed.band)) == expected
