"""Fixtures for the Wrapper input tests: a real S3-protocol server (moto) on a free loopback port.

Every test gets its own bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest
from moto.server import ThreadedMotoServer

from services.wrapper.inputs import S3Access, make_s3_client
from services.wrapper.inputs.s3_listing import S3Client
from wrapper_input_data import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_access(moto_endpoint: str) -> S3Access:
    access = S3Access(
        bucket_name=f"workflow-{uuid.uuid4().hex[:12]}",
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        endpoint_url=moto_endpoint,
        max_attempts=2,
    )
    make_s3_client(access).create_bucket(Bucket=access.bucket_name)
    return access


@pytest.fixture
def s3_client(s3_access: S3Access) -> S3Client:
    return make_s3_client(s3_access)
