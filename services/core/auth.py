"""Who may call a service's state-changing entry points: verification of bearer tokens, and an aiohttp middleware.

Two modes, chosen by ``EOML_AUTH_MODE`` (``AuthSettings``):

- ``oidc`` (Kubernetes): Knative Eventing's sender identity (feature flag ``authentication-oidc``). A KafkaSource
  whose ``spec.sink.audience`` is set sends ``Authorization: Bearer <JWT>`` issued by the cluster for its own service
  account (``system:serviceaccount:<ns>:<source>-oidc-sources.knative.dev-kafkasource``). The token is verified as
  Knative's own verifier does: the issuer's discovery document (``<discovery base>/.well-known/openid-configuration``)
  names the ``jwks_uri``; the signature is checked against those keys (cached; fetched again, rate-limited, when a
  token names an unknown ``kid``), then ``iss``, ``aud`` (this service's audience), ``exp``/``nbf`` and ``sub``
  (one of the allowed sender patterns; ``*`` matches any run of characters).
- ``token`` (the local platform): one shared random token that ``eo-platform up`` writes to a 0600 file; the local
  event plane sends it as ``Authorization: Bearer``.
- ``none``: nothing is checked (tests of other packages, development); the services log a warning at startup.

Refusals: 401 for a missing, malformed, badly signed, expired or wrong-audience/issuer token; 403 for a valid token
of a sender that is not allowed. Nothing of the request (body, token) reaches the log line or the answer.
"""

from __future__ import annotations

import fnmatch
import hmac
import json
import logging
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from .settings import ENV_PREFIX, ServiceSettings, comma_or_json_list

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
# Where a pod finds its own service-account token and the cluster CA (to read the API server's discovery document,
# which Kubernetes serves to authenticated service accounts).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Knative's dispatcher signs with the API server's service-account keys: RS256 by default, ES256 where configured.
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
OPEN_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}AUTH_", extra="ignore")

    mode: Literal["none", "oidc", "token"] = "none"
    # oidc: the expected ``iss``; the discovery document is read from ``discovery_url`` or else
    # ``<issuer>/.well-known/openid-configuration``.
    issuer: str = ""
    discovery_url: str = ""
    # This service's audience (what the sources put in ``spec.sink.audience``).
    audience: str = ""
    # Allowed ``sub`` patterns (comma-separated or JSON); empty: any subject the issuer signed for this audience.
    allowed_subjects: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # TLS and bearer token for reading the discovery document and keys ("" = system CAs, no token).
    ca_file: str = ""
    discovery_token_file: str = ""
    # Clock skew tolerated on exp/nbf/iat.
    leeway_s: float = Field(30.0, ge=0, le=600)
    # Keys are fetched again at most this often when a token names an unknown key id.
    jwks_min_refresh_s: float = Field(30.0, ge=0)
    http_timeout_s: float = Field(5.0, gt=0)
    # token: the shared token, or a file holding it (the file wins when both are set).
    token: SecretStr = SecretStr("")
    token_file: str = ""

    @field_validator("allowed_subjects", mode="before")
    @classmethod
    def _pattern_list(cls, value: object) -> object:
        return comma_or_json_list(value)

    def shared_token(self) -> str:
        if self.token_file:
            return Path(self.token_file).read_text(encoding="utf-8").strip()
        return self.token.get_secret_value()


class AuthError(Exception):
    """A request that is not authenticated; ``status`` is 401 (who are you?) or 403 (not you)."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Caller:
    subject: str
    mode: str


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization is not a Bearer token")
    return token.strip()


def subject_allowed(subject: str, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(subject, pattern) for pattern in patterns)


class SharedTokenVerifier:
    """Local mode: the bearer token must equal the shared token (constant-time comparison)."""

    mode = "token"

    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the shared token must have at least 16 characters")
        self._token = token.encode("utf-8")

    def verify(self, token: str) -> Caller:
        if not hmac.compare_digest(token.encode("utf-8"), self._token):
            raise AuthError("token does not match the platform's token")
        return Caller(subject="local-platform", mode=self.mode)


class OidcVerifier:
    """JWT verification against an OIDC issuer's discovery document and JWKS (Knative's sender identity)."""

    mode = "oidc"

    def __init__(self, issuer: str, audience: str, allowed_subjects: list[str] | None = None, *,
                 discovery_url: str = "", ca_file: str = "", discovery_token_file: str = "",
                 leeway_s: float = 30.0, jwks_min_refresh_s: float = 30.0, http_timeout_s: float = 5.0) -> None:
        if not issuer or not audience:
            raise ValueError("OIDC verification needs an issuer and an audience")
        self.issuer = issuer
        self.audience = audience
        self.allowed_subjects = list(allowed_subjects or [])
        self.discovery_url = discovery_url or issuer.rstrip("/") + DISCOVERY_PATH
        self.leeway_s = leeway_s
        self.jwks_min_refresh_s = jwks_min_refresh_s
        self.http_timeout_s = http_timeout_s
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._discovery_token_file = discovery_token_file
        self._keys: dict[str, Any] = {}
        self._keys_fetched_at = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> "OidcVerifier":
        return cls(settings.issuer, settings.audience, settings.allowed_subjects,
                   discovery_url=settings.discovery_url, ca_file=settings.ca_file,
                   discovery_token_file=settings.discovery_token_file, leeway_s=settings.leeway_s,
                   jwks_min_refresh_s=settings.jwks_min_refresh_s, http_timeout_s=settings.http_timeout_s)

    def _get_json(self, url: str) -> Any:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if self._discovery_token_file:
            token = Path(self._discovery_token_file).read_text(encoding="utf-8").strip()
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=self.http_timeout_s, context=self._ssl) as response:
            return json.loads(response.read(1024 * 1024))

    def refresh_keys(self) -> None:
        import jwt

        discovery = self._get_json(self.discovery_url)
        if discovery.get("issuer") != self.issuer:
            raise AuthError("the discovery document names another issuer")
        jwks = self._get_json(discovery["jwks_uri"])
        keys = {}
        for entry in jwks.get("keys", []):
            try:
                keys[entry.get("kid", "")] = jwt.PyJWK(entry)
            except (jwt.PyJWTError, KeyError, ValueError):
                continue  # a key type or algorithm this verifier does not use
        self._keys = keys
        self._keys_fetched_at = time.monotonic()
        log.info("issuer keys loaded", extra={"issuer": self.issuer, "keys": len(keys)})

    def _key(self, kid: str) -> Any:
        with self._lock:
            key = self._keys.get(kid)
            if key is None and time.monotonic() - self._keys_fetched_at >= self.jwks_min_refresh_s:
                try:
                    self.refresh_keys()
                except AuthError:
                    raise
                except Exception as error:  # noqa: BLE001 - issuer unreachable: refuse, say why in the log only
                    log.error("issuer keys not loaded", extra={"issuer": self.issuer,
                                                               "error": f"{type(error).__name__}: {error}"[:300]})
                    raise AuthError("issuer keys unavailable") from None
                key = self._keys.get(kid)
            if key is None:
                raise AuthError("token signed with an unknown key")
            return key

    def verify(self, token: str) -> Caller:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise AuthError("token algorithm not accepted")
        key = self._key(str(header.get("kid", "")))
        try:
            claims = jwt.decode(token, key=key.key, algorithms=[header["alg"]], audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway_s,
                                options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token from another issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad token signature") from None
        except jwt.PyJWTError as error:
            raise AuthError(f"invalid token ({type(error).__name__})") from None
        subject = str(claims["sub"])
        if not subject_allowed(subject, self.allowed_subjects):
            raise AuthError("sender identity not allowed", status=403)
        return Caller(subject=subject, mode=self.mode)


Verifier = OidcVerifier | SharedTokenVerifier


def verifier_from_settings(settings: AuthSettings | None = None) -> Verifier | None:
    """The verifier the settings ask for; None in mode ``none`` (with a warning: every entry point is open)."""
    settings = settings or AuthSettings()
    if settings.mode == "oidc":
        return OidcVerifier.from_settings(settings)
    if settings.mode == "token":
        return SharedTokenVerifier(settings.shared_token())
    log.warning("authentication disabled (EOML_AUTH_MODE=none): every entry point accepts any caller")
    return None


def outgoing_auth_headers(settings: AuthSettings | None = None) -> dict[str, str]:
    """What a local sender (the local event plane) adds to its requests: the shared token in mode ``token``."""
    settings = settings or AuthSettings()
    if settings.mode == "token":
        return {"Authorization": f"Bearer {settings.shared_token()}"}
    return {}


def auth_middleware(verifier: Verifier) -> Callable[..., Awaitable[Any]]:
    """aiohttp middleware: every request except GET/HEAD/OPTIONS (health, readiness, status) needs a valid token.

    The refusal is decided before the body is read; the log line names the method, path and reason only."""
    import asyncio

    from aiohttp import web

    @web.middleware
    async def authenticate(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        if request.method in OPEN_METHODS:
            return await handler(request)
        try:
            token = bearer_token(request.headers.get("Authorization"))
            # Verification may fetch the issuer's keys (blocking I/O): off the event loop.
            await asyncio.to_thread(verifier.verify, token)
        except AuthError as refused:
            log.warning("request refused", extra={"method": request.method, "path": request.path,
                                                  "status": refused.status, "reason": refused.reason})
            headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if refused.status == 401 else {}
            return web.json_response({"error": refused.reason}, status=refused.status, headers=headers)
        return await handler(request)

    return authenticate
