"""The S3 client connects to the addresses the endpoint policy checked, never to what DNS answers afterwards
(services/wrapper/inputs/s3_pinning.py), and TLS still verifies the endpoint's host name.

The resolver is the process's own (``socket.getaddrinfo``, patched here): for ``rebinding-s3`` it answers
127.0.0.1 (where a real moto S3 server listens) to the policy's check, then 127.0.0.2 (where a listener on the same
port counts connections, and which the test's policy denies) to every later question: DNS rebinding between check and
connect. Expected: objects are written and read through moto, the rebinding target sees no connection; a checked
address the policy refuses at connect time is not dialled; over https the certificate is checked against the URL's
host name, not against the pinned address.
"""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any, Iterator

import pytest
from botocore.exceptions import BotoCoreError, ClientError
from moto.server import ThreadedMotoServer

from security_support import RecordingServer, issuer_ca_file
from services.core.s3_endpoint_policy import CheckedEndpoint, EndpointRefused, S3EndpointPolicy
from services.wrapper.inputs import S3Access, make_s3_client
from services.wrapper.inputs.s3_pinning import pin_client_connections

REBINDING_HOST = "rebinding-s3"  # one label: moto reads a dotted host as <bucket>.<domain>
CHECKED_ADDRESS = "127.0.0.1"
REBOUND_ADDRESS = "127.0.0.2"


class TestPolicy(S3EndpointPolicy):
    """The local platform's policy (http, loopback) whose address rules also deny the rebinding target."""

    __test__ = False

    def check_address(self, address: str, host: str) -> None:
        if address == REBOUND_ADDRESS:
            raise EndpointRefused("test-denied", f"host {host!r} resolves to the test's denied address")
        super().check_address(address, host)


class ChangingResolver:
    """``socket.getaddrinfo`` that answers ``first`` for ``host`` once, then ``later``; other names as usual."""

    def __init__(self, host: str, first: str, later: str) -> None:
        self.host, self.answers, self.later = host, [first], later
        self.questions = 0
        self._real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != self.host:
            return self._real(host, port, *args, **kwargs)
        self.questions += 1
        address = self.answers.pop(0) if self.answers else self.later
        return self._real(address, port, *args, **kwargs)


class ConnectionCounter:
    """A TCP listener that counts connections and closes each at once."""

    def __init__(self, host: str, port: int) -> None:
        self.connections = 0
        self._socket = socket.create_server((host, port))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._socket.close()


@pytest.fixture()
def moto_port() -> Iterator[int]:
    server = ThreadedMotoServer(ip_address=CHECKED_ADDRESS, port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()[1]
    finally:
        server.stop()


def access(endpoint_url: str) -> S3Access:
    return S3Access(bucket_name=f"pinned-{uuid.uuid4().hex[:12]}", aws_access_key_id="test", max_attempts=1,
                    aws_secret_access_key="test", endpoint_url=endpoint_url, connect_timeout_s=2, read_timeout_s=5)


def local_policy(endpoint: str) -> TestPolicy:
    return TestPolicy([endpoint], allow_http=True, allow_private=True)


def test_a_rebinding_resolver_cannot_move_the_connection(moto_port: int, monkeypatch) -> None:
    endpoint = f"http://{REBINDING_HOST}:{moto_port}"
    rebound = ConnectionCounter(REBOUND_ADDRESS, moto_port)
    resolver = ChangingResolver(REBINDING_HOST, CHECKED_ADDRESS, REBOUND_ADDRESS)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    try:
        bucket = access(endpoint)
        client = make_s3_client(bucket, local_policy(endpoint))
        assert resolver.questions == 1  # the policy's check, answered 127.0.0.1
        client.create_bucket(Bucket=bucket.bucket_name)
        for index in range(3):
            client.put_object(Bucket=bucket.bucket_name, Key=f"in/{index}.bin", Body=b"pinned" * index)
        client.close()  # every later request opens a new connection
        listed = client.list_objects_v2(Bucket=bucket.bucket_name, Prefix="in/")
        assert [item["Key"] for item in listed["Contents"]] == ["in/0.bin", "in/1.bin", "in/2.bin"]
        assert client.get_object(Bucket=bucket.bucket_name, Key="in/2.bin")["Body"].read() == b"pinnedpinned"
        # The resolver would now send the client to 127.0.0.2: it is never asked, and nothing connects there.
        assert socket.getaddrinfo(REBINDING_HOST, moto_port)[0][4][0] == REBOUND_ADDRESS
        assert rebound.connections == 0
    finally:
        rebound.close()


def test_an_approved_address_the_policy_now_refuses_is_not_dialled(moto_port: int) -> None:
    endpoint = f"http://{REBINDING_HOST}:{moto_port}"
    rebound = ConnectionCounter(REBOUND_ADDRESS, moto_port)
    try:
        bucket = access(endpoint)
        client = make_s3_client(bucket, S3EndpointPolicy(allow_http=True, allow_private=True,
                                                         resolver=lambda _host, _port: [CHECKED_ADDRESS]))
        checked = CheckedEndpoint(url=endpoint, scheme="http", host=REBINDING_HOST, port=moto_port,
                                  addresses=(REBOUND_ADDRESS,))
        pin_client_connections(client, checked, local_policy(endpoint))
        with pytest.raises((BotoCoreError, ClientError, EndpointRefused)):
            client.list_objects_v2(Bucket=bucket.bucket_name)
        assert rebound.connections == 0
    finally:
        rebound.close()


def test_tls_is_verified_against_the_host_name_not_the_pinned_address(monkeypatch) -> None:
    server = RecordingServer(status=200, tls=True)  # certificate for 127.0.0.1 and localhost only
    monkeypatch.setenv("AWS_CA_BUNDLE", issuer_ca_file())
    try:
        resolve_all_to_loopback = lambda _host, _port: [CHECKED_ADDRESS]  # noqa: E731
        named = f"https://localhost:{server.port}"
        client = make_s3_client(access(named), S3EndpointPolicy(allow_private=True, resolver=resolve_all_to_loopback))
        client.head_bucket(Bucket="bucket")  # the certificate names localhost: accepted
        assert server.requests and server.request_headers[-1]["host"] == f"localhost:{server.port}"
        seen = len(server.requests)
        # Same pinned address, but the URL's host is not in the certificate: the handshake fails, nothing is sent.
        other = f"https://{REBINDING_HOST}:{server.port}"
        client = make_s3_client(access(other), S3EndpointPolicy(allow_private=True, resolver=resolve_all_to_loopback))
        with pytest.raises(BotoCoreError, match="(?i)certificate|ssl"):
            client.head_bucket(Bucket="bucket")
        assert len(server.requests) == seen
    finally:
        server.close()
