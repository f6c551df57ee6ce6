"""Connect an S3 client only to the addresses the endpoint policy approved (services/core/s3_endpoint_policy.py).

The policy resolves the endpoint's host and checks every address; botocore would resolve the name again for every
new connection, so a resolver that answers differently after the check (DNS rebinding) could send the request
elsewhere. Here botocore's urllib3 connections dial the checked addresses themselves (each checked again by the
policy before the dial), never the name; TLS still verifies the certificate against the host name (SNI and
hostname check use the URL's host, only the TCP destination is pinned). A connection to any other host (a proxy,
a redirected URL) is refused before a socket is opened.

botocore exposes no hook for its connection class; ``pin_client_connections`` replaces the pool classes of the
client's ``URLLib3Session`` (``_pool_classes_by_scheme``, read by its pool and proxy managers: botocore/httpsession.py).
"""

from __future__ import annotations

import socket
from typing import Any

from botocore.awsrequest import AWSHTTPConnection, AWSHTTPConnectionPool, AWSHTTPSConnection, AWSHTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection

from services.core.s3_endpoint_policy import CheckedEndpoint, EndpointRefused, S3EndpointPolicy


def _bare(host: str) -> str:
    """A host as urllib3 and the policy both spell it: no IPv6 brackets, no FQDN dot, lower case."""
    return host.strip("[]").rstrip(".").lower()


class _PinnedConnection:
    """Mixin for botocore's connection classes; ``endpoint`` and ``policy`` are set on the per-client subclass."""

    endpoint: CheckedEndpoint
    policy: S3EndpointPolicy
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        endpoint = self.endpoint
        if _bare(self.host) != _bare(endpoint.host) or self.port != endpoint.port:
            raise EndpointRefused("pinned", f"connection to a host other than {endpoint.host!r} refused")
        failure: Exception | None = None
        for address in endpoint.addresses:
            self.policy.check_address(address, endpoint.host)
            try:
                return connection.create_connection((address, self.port), self.timeout,
                                                    source_address=self.source_address,
                                                    socket_options=self.socket_options)
            except OSError as error:  # socket.timeout included: try the next approved address
                failure = error
        if isinstance(failure, socket.timeout):
            raise ConnectTimeoutError(self, f"Connection to {endpoint.host} timed out (connect timeout="
                                            f"{self.timeout})")
        raise NewConnectionError(self, f"Failed to establish a new connection to {endpoint.host}: {failure}")


def pin_client_connections(client: Any, endpoint: CheckedEndpoint, policy: S3EndpointPolicy) -> Any:
    """Make ``client`` (a botocore client) connect to ``endpoint.addresses`` only; returns the client."""

    class PinnedHTTPConnection(_PinnedConnection, AWSHTTPConnection):
        pass

    class PinnedHTTPSConnection(_PinnedConnection, AWSHTTPSConnection):
        pass

    for connection_class in (PinnedHTTPConnection, PinnedHTTPSConnection):
        connection_class.endpoint = endpoint
        connection_class.policy = policy
    pools = {
        "http": type("PinnedHTTPConnectionPool", (AWSHTTPConnectionPool,), {"ConnectionCls": PinnedHTTPConnection}),
        "https": type("PinnedHTTPSConnectionPool", (AWSHTTPSConnectionPool,), {"ConnectionCls": PinnedHTTPSConnection}),
    }
    session = client._endpoint.http_session  # noqa: SLF001 - see the module docstring
    session._pool_classes_by_scheme = pools  # noqa: SLF001
    session._manager.pool_classes_by_scheme = pools  # noqa: SLF001
    return client
