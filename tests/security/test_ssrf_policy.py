"""Server-side request forgery through ``S3_bucket.endpoint_url``: every attempt is refused before a request is sent.

Attacks: the cloud metadata address, loopback, IPv6 link-local and AWS's IPv6 metadata range, decimal/octal/hex IP
spellings, a DNS name resolving to loopback (``localhost`` via the system resolver, and a name added through the
resolver hook), the cluster's pod/service range, userinfo in the URL, ``file://`` and other schemes, plain http,
hosts off the allowlist, and redirects (http -> https to a private address, and to another local server) served by
real local HTTP servers. The controller refuses the same message at intake; the Wrapper refuses before connecting.
"""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from security_support import CANARY, RecordingServer
from services.controller.messages import MessageRejected, parse_workflow_message
from services.core.s3_endpoint_policy import EndpointRefused, S3EndpointPolicy
from services.wrapper.inputs import S3Access, make_s3_client
from services.wrapper.inputs.s3_listing import list_objects
from services.wrapper.inputs.settings import InputLimits
from services.wrapper.inputs.types import InputError

PUBLIC_IP = "52.219.170.10"  # an address in AWS's public S3 ranges: what a legitimate endpoint resolves to


def fixed_resolver(table: dict[str, list[str]]):
    def resolve(host: str, _port: int) -> list[str]:
        if host in table:
            return table[host]
        raise OSError(f"{host} does not resolve")

    return resolve


def production_policy(**overrides) -> S3EndpointPolicy:
    resolver = fixed_resolver({"s3.eu-central-1.amazonaws.com": [PUBLIC_IP],
                               "s3.attacker.example": ["127.0.0.1"],  # DNS answer pointing at loopback
                               "rebind.attacker.example": [PUBLIC_IP, "169.254.169.254"],
                               "svc.attacker.example": ["34.118.230.10"],
                               "v6.attacker.example": ["::ffff:169.254.169.254"]})
    return S3EndpointPolicy(**{"denied_cidrs": ["34.118.224.0/20"], "resolver": resolver, **overrides})


@pytest.mark.parametrize("url, rule", [
    ("https://169.254.169.254/latest/meta-data/", "link-local-or-reserved"),
    ("https://[fd00:ec2::254]/", "link-local-or-reserved"),
    ("https://[fe80::1%25eth0]/", "link-local-or-reserved"),
    ("https://127.0.0.1:9000", "loopback"),
    ("https://[::1]/", "loopback"),
    ("https://10.0.0.12", "private"),
    ("https://2130706433/", "ip-spelling"),          # 127.0.0.1 in decimal
    ("https://0177.0.0.1/", "ip-spelling"),          # octal
    ("https://0x7f000001/", "ip-spelling"),          # hex
    ("https://0xa9.0xfe.0xa9.0xfe/", "ip-spelling"),  # 169.254.169.254 in hex
    ("https://127.1/", "ip-spelling"),
    ("https://s3.attacker.example", "loopback"),      # a name that resolves to loopback
    ("https://rebind.attacker.example", "link-local-or-reserved"),  # one bad address among good ones
    ("https://v6.attacker.example", "link-local-or-reserved"),      # IPv4-mapped IPv6
    ("https://svc.attacker.example", "cluster-network"),
    ("https://nowhere.invalid", "dns"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "scheme"),
    ("ftp://s3.eu-central-1.amazonaws.com/", "scheme"),
    ("http://s3.eu-central-1.amazonaws.com", "scheme"),  # plain http outside local mode
    (f"https://AKIA:{CANARY}@s3.eu-central-1.amazonaws.com", "userinfo"),
    ("https://s3.eu-central-1.amazonaws.com:99999", "malformed"),
])
def test_production_policy_refuses(url: str, rule: str) -> None:
    with pytest.raises(EndpointRefused) as refused:
        production_policy().check(url)
    assert refused.value.rule == rule
    assert CANARY not in str(refused.value) and "meta-data" not in str(refused.value)


def test_production_policy_accepts_a_public_https_endpoint_and_the_allowlist_narrows_it() -> None:
    checked = production_policy().check("https://s3.eu-central-1.amazonaws.com")
    assert checked.addresses == (PUBLIC_IP,) and checked.port == 443
    allowlisted = production_policy(allowed_endpoints=["https://*.amazonaws.com"])
    assert allowlisted.check("https://s3.eu-central-1.amazonaws.com").host == "s3.eu-central-1.amazonaws.com"
    with pytest.raises(EndpointRefused) as refused:
        production_policy(allowed_endpoints=["https://minio.example.org"]).check("https://s3.eu-central-1.amazonaws.com")
    assert refused.value.rule == "allowlist"


def test_localhost_through_the_system_resolver_is_loopback() -> None:
    with pytest.raises(EndpointRefused) as refused:
        S3EndpointPolicy().check("https://localhost:9000")
    assert refused.value.rule == "loopback"


def test_local_mode_allows_loopback_http_but_never_metadata() -> None:
    local = S3EndpointPolicy(allow_http=True, allow_private=True)
    assert local.check("http://127.0.0.1:9000").addresses == ("127.0.0.1",)
    for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/", "http://0x7f.1/", "file:///etc/passwd"):
        with pytest.raises(EndpointRefused):
            local.check(url)


def test_controller_refuses_the_workflow_message_at_intake(monkeypatch) -> None:
    monkeypatch.setenv("EOML_S3_POLICY_ALLOW_HTTP", "false")
    monkeypatch.setenv("EOML_S3_POLICY_ALLOW_PRIVATE", "false")
    for endpoint, rule in (("https://169.254.169.254", "link-local-or-reserved"), ("https://2130706433", "ip-spelling"),
                           (f"https://user:{CANARY}@s3.example.org", "userinfo"), ("file:///etc/shadow", "scheme"),
                           ("http://s3.example.org", "scheme")):
        message = {"workflow_name": "wf", "workflow_status": "published", "Topics": {"in": "a.in"},
                   "ML": {"ServiceName": "classify", "Namespace": "uc1"},
                   "S3_bucket": {"aws_access_key_id": "k", "aws_secret_access_key": CANARY,
                                 "s3-bucket-name": "b", "endpoint_url": endpoint}}
        with pytest.raises(MessageRejected) as rejected:
            parse_workflow_message(json.dumps(message))
        assert rule in rejected.value.reason and CANARY not in rejected.value.reason


def access(endpoint: str) -> S3Access:
    return S3Access(bucket_name="bucket", aws_access_key_id=SecretStr("AKIA-" + CANARY),
                    aws_secret_access_key=SecretStr(CANARY), endpoint_url=endpoint, max_attempts=1,
                    connect_timeout_s=2, read_timeout_s=5)


def test_wrapper_refuses_before_connecting() -> None:
    with pytest.raises(InputError) as refused:
        make_s3_client(access("http://169.254.169.254"), S3EndpointPolicy(allow_http=True, allow_private=True))
    assert "link-local" in str(refused.value) and CANARY not in str(refused.value)


@pytest.mark.parametrize("status, location_of", [
    (307, lambda target: f"{target.url}/bucket"),                        # to another local server
    (302, lambda _target: "https://169.254.169.254/latest/meta-data/"),  # http -> https to the metadata address
    (301, lambda target: f"{target.url}/bucket"),
])
def test_redirects_are_never_followed(status: int, location_of) -> None:
    target = RecordingServer(host="127.0.0.2")
    redirector = RecordingServer(status=status)
    redirector.headers = {"Location": location_of(target), "x-amz-bucket-region": "eu-west-1"}
    try:
        client = make_s3_client(access(redirector.url), S3EndpointPolicy(allow_http=True, allow_private=True))
        with pytest.raises(InputError) as failed:
            list(list_objects(client, "bucket", "in/", InputLimits()))
        assert CANARY not in str(failed.value)
        assert redirector.requests, "the endpoint itself was asked"
        assert target.requests == []
    finally:
        redirector.close()
        target.close()
