"""The verifier's fetch of the issuer's keys cannot be steered or stalled by a caller, and tokens are held to their
key's algorithm and to a maximum lifetime (services/core/oidc_keys.py, services/core/auth.py).

Real issuers on loopback (https with a certificate made here; one plain-http issuer), real RSA/EC keys, real tokens.
Attack -> expected:

- discovery URL or ``jwks_uri`` with ``file://`` or ``http://`` -> refused (no file read, the http server unasked);
- the discovery URL answers a redirect -> the fetch fails, the redirect target is never asked (no token sent there);
- ``jwks_uri`` on another origin -> keys loaded, the service-account token is not sent there;
- 20 tokens with unknown key ids while the issuer answers 503 -> at most one request to the issuer;
- a slow key refetch (3 s) -> a token whose key is known is verified meanwhile, without waiting;
- PS256 or ES256 tokens naming the issuer's RS256 key -> 401 (no TypeError);
- ``exp - iat`` above ``max_token_lifetime_s`` -> 401; raised setting -> accepted.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from security_support import Issuer, issuer_ca_file, new_rsa_key
from services.core.auth import AuthError, OidcVerifier

AUDIENCE = "serving.knative.dev/service/uc1/classify"
SENDER = "system:serviceaccount:uc1:wf-a-in-oidc-sources.knative.dev-kafkasource"
SERVICE_ACCOUNT_TOKEN = "sa-token-4c1d-must-stay-with-the-issuer"


@pytest.fixture()
def issuer() -> Iterator[Issuer]:
    served = Issuer()
    yield served
    served.close()


@pytest.fixture()
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(SERVICE_ACCOUNT_TOKEN)
    return str(path)


def verifier_for(issuer: Issuer, **options: object) -> OidcVerifier:
    return OidcVerifier(issuer.url, AUDIENCE, [SENDER], ca_file=issuer_ca_file(), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["file:///etc/hostname", "http://127.0.0.1:9/.well-known/openid-configuration"])
def test_discovery_url_must_be_https(url: str) -> None:
    with pytest.raises(ValueError, match="https"):
        OidcVerifier("https://issuer.example", AUDIENCE, discovery_url=url)


def test_jwks_uri_from_a_file_is_refused(issuer: Issuer, tmp_path: Path) -> None:
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps(issuer.jwks()))
    issuer.jwks_uri = keys.as_uri()
    with pytest.raises(AuthError, match="issuer keys unavailable"):
        verifier_for(issuer).verify(issuer.token(SENDER, AUDIENCE))


def test_jwks_uri_over_plain_http_is_refused(issuer: Issuer) -> None:
    plain = Issuer(tls=False)
    try:
        plain.key, plain.kid = issuer.key, issuer.kid
        issuer.jwks_uri = plain.jwks_uri
        with pytest.raises(AuthError, match="issuer keys unavailable"):
            verifier_for(issuer).verify(issuer.token(SENDER, AUDIENCE))
        assert plain.requests == []
    finally:
        plain.close()


def test_no_redirect_is_followed_and_the_token_stays_with_the_issuer(issuer: Issuer, token_file: str) -> None:
    elsewhere = Issuer()
    try:
        issuer.redirect_to = elsewhere.url
        with pytest.raises(AuthError, match="issuer keys unavailable"):
            verifier_for(issuer, discovery_token_file=token_file).verify(issuer.token(SENDER, AUDIENCE))
        assert issuer.requests == ["/.well-known/openid-configuration"]
        assert issuer.request_headers[0]["authorization"] == f"Bearer {SERVICE_ACCOUNT_TOKEN}"
        assert elsewhere.requests == []
    finally:
        elsewhere.close()


def test_a_cross_origin_jwks_uri_gets_no_service_account_token(issuer: Issuer, token_file: str) -> None:
    keys_host = Issuer()
    try:
        keys_host.key, keys_host.kid = issuer.key, issuer.kid
        issuer.jwks_uri = keys_host.jwks_uri
        caller = verifier_for(issuer, discovery_token_file=token_file).verify(issuer.token(SENDER, AUDIENCE))
        assert caller.subject == SENDER
        assert issuer.request_headers[0]["authorization"] == f"Bearer {SERVICE_ACCOUNT_TOKEN}"
        assert keys_host.requests == ["/openid/v1/jwks"]
        assert "authorization" not in keys_host.request_headers[0]
    finally:
        keys_host.close()


def test_an_issuer_that_is_down_is_not_asked_once_per_bad_token(issuer: Issuer) -> None:
    verifier = verifier_for(issuer, jwks_min_refresh_s=0)
    issuer.status = 503
    for attempt in range(20):
        with pytest.raises(AuthError):
            verifier.verify(issuer.token(SENDER, AUDIENCE, key=new_rsa_key(), kid=f"attacker-{attempt}"))
    assert len(issuer.requests) == 1


def test_a_known_key_is_not_held_up_by_a_slow_refetch(issuer: Issuer) -> None:
    verifier = verifier_for(issuer, jwks_min_refresh_s=0, http_timeout_s=10)
    valid = issuer.token(SENDER, AUDIENCE)
    assert verifier.verify(valid).subject == SENDER
    issuer.jwks_delay_s = 3.0
    unknown = issuer.token(SENDER, AUDIENCE, key=new_rsa_key(), kid="attacker-slow")
    slow = threading.Thread(target=lambda: pytest.raises(AuthError, verifier.verify, unknown), daemon=True)
    slow.start()
    deadline = time.monotonic() + 5
    while issuer.requests.count("/openid/v1/jwks") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert issuer.requests.count("/openid/v1/jwks") == 2  # the refetch is in flight
    started = time.monotonic()
    assert verifier.verify(valid).subject == SENDER
    assert time.monotonic() - started < 1.0
    slow.join(10)


def test_the_keys_algorithm_is_enforced(issuer: Issuer) -> None:
    verifier = verifier_for(issuer)
    assert verifier.verify(issuer.token(SENDER, AUDIENCE)).subject == SENDER
    with pytest.raises(AuthError, match="algorithm"):
        verifier.verify(issuer.token(SENDER, AUDIENCE, algorithm="PS256"))  # right key, RSA-PSS instead of PKCS#1
    ec_token = issuer.token(SENDER, AUDIENCE, key=ec.generate_private_key(ec.SECP256R1()),  # type: ignore[arg-type]
                            algorithm="ES256")
    assert jwt.get_unverified_header(ec_token) == {"alg": "ES256", "kid": issuer.kid, "typ": "JWT"}
    with pytest.raises(AuthError, match="algorithm"):
        verifier.verify(ec_token)


def test_tokens_live_no_longer_than_the_maximum(issuer: Issuer) -> None:
    long_lived = issuer.token(SENDER, AUDIENCE, expires_in_s=2 * 86400)
    with pytest.raises(AuthError, match="lifetime"):
        verifier_for(issuer).verify(long_lived)
    assert verifier_for(issuer, max_token_lifetime_s=3 * 86400).verify(long_lived).subject == SENDER
