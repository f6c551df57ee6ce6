"""An OIDC issuer's signing keys (discovery document, then JWKS), fetched so that no token can steer the fetch.

- https only, for the configured discovery URL and for the ``jwks_uri`` the discovery document names: the opener
  has no ``file:``/``ftp:``/``data:`` handler at all, and a plain-http URL is refused before any request;
- no redirects (a 3xx is a failed fetch), so no request, and no service-account token, ever goes elsewhere;
- the service-account token (the API server's discovery endpoint wants one) goes to the discovery URL, and to the
  ``jwks_uri`` only when it has the same origin (scheme, host, port);
- a token naming an unknown ``kid`` starts at most one fetch per ``min_refresh_s``, and after a failed fetch none for
  ``failure_backoff_s`` (doubling per failure up to ``max_failure_backoff_s``): an issuer that is down is not asked
  once per bad token;
- the lock guards bookkeeping only, never network I/O: a token whose key is known is verified while a fetch is slow.

The JWKS is parsed and filtered (``use`` ``sig`` or none, a ``kid``) by PyJWT's ``PyJWKClient``; each key keeps the
algorithm its JWK names (``alg``), which the verifier enforces.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from jwt import PyJWK, PyJWKClient

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1024 * 1024


class IssuerKeysUnavailable(Exception):
    """The issuer's keys could not be loaded; the message is safe to log (no token, no body)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None  # urllib then raises HTTPError for the 3xx


def require_https(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ValueError(f"the {what} must be an https URL, not {parts.scheme or 'no'} scheme")
    return url


def origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or 443


def https_opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    """An opener that speaks https and nothing else, and follows no redirect."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPSHandler(context=context), _NoRedirect(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


class _JwksClient(PyJWKClient):
    """PyJWT's JWKS client, its network fetch replaced by ours (https only, no redirects, our headers)."""

    def __init__(self, uri: str, fetch_json: Callable[[str], Any]) -> None:
        super().__init__(uri, cache_jwk_set=False)
        self._fetch_json = fetch_json

    def fetch_data(self) -> Any:
        return self._fetch_json(self.uri)


class IssuerKeys:
    def __init__(self, issuer: str, discovery_url: str, *, ssl_context: ssl.SSLContext | None = None,
                 token_file: str = "", timeout_s: float = 5.0, min_refresh_s: float = 30.0,
                 failure_backoff_s: float = 10.0, max_failure_backoff_s: float = 300.0) -> None:
        self.issuer = issuer
        self.discovery_url = require_https(discovery_url, "OIDC discovery URL")
        self.timeout_s = timeout_s
        self.min_refresh_s = min_refresh_s
        self.failure_backoff_s = failure_backoff_s
        self.max_failure_backoff_s = max_failure_backoff_s
        self._token_file = token_file
        self._opener = https_opener(ssl_context)
        self._keys: dict[str, PyJWK] = {}  # replaced whole, never mutated: read without the lock
        self._lock = threading.Lock()
        self._last_fetch = float("-inf")  # when the last fetch started
        self._backoff_until = float("-inf")  # after a failed fetch
        self._failures = 0
        self._in_flight: threading.Event | None = None

    def get(self, kid: str) -> PyJWK | None:
        """The key ``kid``; an unknown one triggers a fetch when one is due (or waits for the fetch in flight)."""
        key = self._keys.get(kid)
        if key is None:
            self._refresh_if_due()
            key = self._keys.get(kid)
        return key

    def _refresh_if_due(self) -> None:
        with self._lock:
            in_flight = self._in_flight
            if in_flight is None:
                now = time.monotonic()
                if now < self._backoff_until or now - self._last_fetch < self.min_refresh_s:
                    return
                in_flight = self._in_flight = threading.Event()
                self._last_fetch = now
                owner = True
            else:
                owner = False
        if not owner:
            in_flight.wait(2 * self.timeout_s + 1)
            return
        try:
            keys = self._fetch_keys()
        except Exception as error:  # noqa: BLE001 - any failure: back off, refuse the token, say why in the log
            with self._lock:
                self._failures += 1
                backoff = min(self.failure_backoff_s * 2 ** (self._failures - 1), self.max_failure_backoff_s)
                self._backoff_until = time.monotonic() + backoff
            log.error("issuer keys not loaded", extra={"issuer": self.issuer, "retry_in_s": round(backoff, 1),
                                                       "error": f"{type(error).__name__}: {error}"[:300]})
            raise IssuerKeysUnavailable("issuer keys unavailable") from None
        else:
            with self._lock:
                self._keys = keys
                self._failures = 0
            log.info("issuer keys loaded", extra={"issuer": self.issuer, "keys": len(keys)})
        finally:
            with self._lock:
                self._in_flight = None
            in_flight.set()

    def _fetch_keys(self) -> dict[str, PyJWK]:
        discovery = self._get_json(self.discovery_url, send_token=True)
        if discovery.get("issuer") != self.issuer:
            raise IssuerKeysUnavailable("the discovery document names another issuer")
        jwks_uri = require_https(str(discovery.get("jwks_uri") or ""), "jwks_uri")
        send_token = origin(jwks_uri) == origin(self.discovery_url)
        client = _JwksClient(jwks_uri, lambda url: self._get_json(url, send_token=send_token))
        return {key.key_id: key for key in client.get_signing_keys(refresh=True) if key.key_id}

    def _get_json(self, url: str, *, send_token: bool) -> dict[str, Any]:
        request = urllib.request.Request(require_https(url, "issuer URL"), headers={"Accept": "application/json"})
        if send_token and self._token_file:
            token = Path(self._token_file).read_text(encoding="utf-8").strip()
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                body = response.read(MAX_DOCUMENT_BYTES + 1)
        except urllib.error.HTTPError as error:
            error.close()
            raise IssuerKeysUnavailable(f"HTTP {error.code} from {origin(url)[1]}") from None
        if len(body) > MAX_DOCUMENT_BYTES:
            raise IssuerKeysUnavailable("issuer document too large")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise IssuerKeysUnavailable("issuer document is not a JSON object")
        return document


__all__ = ["IssuerKeys", "IssuerKeysUnavailable", "https_opener", "origin", "require_https"]
