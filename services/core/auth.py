"""Who may call a service's state-changing entry points: verification of bearer tokens, and an aiohttp middleware.

Two modes, chosen by ``EOML_AUTH_MODE`` (``AuthSettings``):

- ``oidc`` (Kubernetes): Knative Eventing's sender identity (feature flag ``authentication-oidc``). A KafkaSource
  whose ``spec.sink.audience`` is set sends ``Authorization: Bearer <JWT>`` issued by the cluster for its own service
  account (``system:serviceaccount:<ns>:<source>-oidc-sources.knative.dev-kafkasource``). The token is verified as
  Knative's own verifier does: the issuer's discovery document (``<discovery base>/.well-known/openid-configuration``)
  names the ``jwks_uri``; the signature is checked against those keys (services/core/oidc_keys.py: https only, no
  redirects, fetched again when a token names an unknown ``kid``, rate-limited and backing off after failures, never
  under a lock a known key's token waits on), with the algorithm the key's JWK names; then ``iss``, ``aud`` (this
  service's audience), ``exp``/``nbf``/``iat``, the lifetime (``exp - iat`` at most ``max_token_lifetime_s``) and
  ``sub``: one of the sender patterns of the route (``route_subjects``, by the route's path template) or else of the
  service (``allowed_subjects``); ``*`` matches any run of characters.
- ``token`` (the local platform): one shared random token that ``eo-platform up`` writes to a 0600 file; the local
  event plane sends it as ``Authorization: Bearer``.
- ``none``: nothing is checked (tests of other packages, development); the services log a warning at startup.

Refusals: 401 for a missing, malformed, badly signed, expired or wrong-audience/issuer token, and for anything else a
caller can put in the header (bytes that are no token, a header naming an algorithm its key does not have): never a
5xx; 403 for a valid token of a sender that is not allowed. Nothing of the request (body, token) reaches the log line
or the answer.
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from .oidc_keys import IssuerKeys, IssuerKeysUnavailable
from .settings import ENV_PREFIX, ServiceSettings, comma_or_json_list

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
# Where a pod finds its own service-account token and the cluster CA (to read the API server's discovery document,
# which Kubernetes serves to authenticated service accounts).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Knative's dispatcher signs with the API server's service-account keys: RS256 by default, ES256 where configured.
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
OPEN_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# RFC 6750 b64token: what a bearer token may contain. Anything else is refused before it is decoded or compared.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


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
    # Per-route patterns (JSON ``{"<route path template>": [patterns]}``, e.g. the controller's ``"/"`` and
    # ``"/dead-letter"``): a listed route accepts only its own senders, instead of ``allowed_subjects``.
    route_subjects: dict[str, list[str]] = Field(default_factory=dict)
    # TLS and bearer token for reading the discovery document and keys ("" = system CAs, no token).
    ca_file: str = ""
    discovery_token_file: str = ""
    # Clock skew tolerated on exp/nbf/iat.
    leeway_s: float = Field(30.0, ge=0, le=600)
    # Longest accepted token lifetime (exp - iat); Knative's dispatcher requests 1 h tokens.
    max_token_lifetime_s: float = Field(3600.0, gt=0)
    # Keys are fetched again at most this often when a token names an unknown key id; after a failed fetch, not
    # before jwks_failure_backoff_s (doubling per failure, at most jwks_max_failure_backoff_s).
    jwks_min_refresh_s: float = Field(30.0, ge=0)
    jwks_failure_backoff_s: float = Field(10.0, ge=0)
    jwks_max_failure_backoff_s: float = Field(300.0, ge=0)
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
    if not _BEARER_TOKEN.fullmatch(token.strip()):
        raise AuthError("malformed token")
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

    def verify(self, token: str, route: str = "") -> Caller:
        if not hmac.compare_digest(token.encode("utf-8"), self._token):
            raise AuthError("token does not match the platform's token")
        return Caller(subject="local-platform", mode=self.mode)


class OidcVerifier:
    """JWT verification against an OIDC issuer's discovery document and JWKS (Knative's sender identity)."""

    mode = "oidc"

    def __init__(self, issuer: str, audience: str, allowed_subjects: list[str] | None = None, *,
                 route_subjects: dict[str, list[str]] | None = None, discovery_url: str = "", ca_file: str = "",
                 discovery_token_file: str = "", leeway_s: float = 30.0, max_token_lifetime_s: float = 3600.0,
                 jwks_min_refresh_s: float = 30.0, jwks_failure_backoff_s: float = 10.0,
                 jwks_max_failure_backoff_s: float = 300.0, http_timeout_s: float = 5.0) -> None:
        if not issuer or not audience:
            raise ValueError("OIDC verification needs an issuer and an audience")
        self.issuer = issuer
        self.audience = audience
        self.allowed_subjects = list(allowed_subjects or [])
        self.route_subjects = {route: list(patterns) for route, patterns in (route_subjects or {}).items()}
        self.leeway_s = leeway_s
        self.max_token_lifetime_s = max_token_lifetime_s
        self.keys = IssuerKeys(issuer, discovery_url or issuer.rstrip("/") + DISCOVERY_PATH,
                               ssl_context=ssl.create_default_context(cafile=ca_file or None),
                               token_file=discovery_token_file, timeout_s=http_timeout_s,
                               min_refresh_s=jwks_min_refresh_s, failure_backoff_s=jwks_failure_backoff_s,
                               max_failure_backoff_s=jwks_max_failure_backoff_s)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> "OidcVerifier":
        return cls(settings.issuer, settings.audience, settings.allowed_subjects,
                   route_subjects=settings.route_subjects, discovery_url=settings.discovery_url,
                   ca_file=settings.ca_file, discovery_token_file=settings.discovery_token_file,
                   leeway_s=settings.leeway_s, max_token_lifetime_s=settings.max_token_lifetime_s,
                   jwks_min_refresh_s=settings.jwks_min_refresh_s,
                   jwks_failure_backoff_s=settings.jwks_failure_backoff_s,
                   jwks_max_failure_backoff_s=settings.jwks_max_failure_backoff_s,
                   http_timeout_s=settings.http_timeout_s)

    @property
    def jwks_min_refresh_s(self) -> float:
        return self.keys.min_refresh_s

    @jwks_min_refresh_s.setter
    def jwks_min_refresh_s(self, value: float) -> None:
        self.keys.min_refresh_s = value

    def subjects_for(self, route: str) -> list[str]:
        return self.route_subjects.get(route, self.allowed_subjects)

    def _key(self, header: dict[str, Any]) -> Any:
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise AuthError("token algorithm not accepted")
        if not isinstance(kid, str) or not kid:
            raise AuthError("token names no key")
        try:
            key = self.keys.get(kid)
        except IssuerKeysUnavailable:
            raise AuthError("issuer keys unavailable") from None
        if key is None:
            raise AuthError("token signed with an unknown key")
        # The key's JWK fixes its algorithm (``alg``, else RS256 for RSA, by curve for EC): a token naming another
        # (PS256 or ES256 against an RS256 key) is refused before any signature check.
        if key.algorithm_name != algorithm:
            raise AuthError("token algorithm does not match its key")
        return key

    def verify(self, token: str, route: str = "") -> Caller:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("malformed token") from None
        key = self._key(header)
        try:
            claims = jwt.decode(token, key=key.key, algorithms=[key.algorithm_name], audience=self.audience,
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
        except (jwt.PyJWTError, ValueError, TypeError) as error:
            raise AuthError(f"invalid token ({type(error).__name__})") from None
        if claims["exp"] - claims["iat"] > self.max_token_lifetime_s + self.leeway_s:
            raise AuthError("token lifetime longer than allowed")
        subject = str(claims["sub"])
        if not subject_allowed(subject, self.subjects_for(route)):
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
            await asyncio.to_thread(verifier.verify, token, route_template(request))
        except AuthError as refused:
            log.warning("request refused", extra={"method": request.method, "path": request.path,
                                                  "status": refused.status, "reason": refused.reason})
            headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if refused.status == 401 else {}
            return web.json_response({"error": refused.reason}, status=refused.status, headers=headers)
        except Exception as error:  # noqa: BLE001 - whatever a header does to a parser is the caller's fault: 401
            log.error("request refused: token verification failed", extra={
                "method": request.method, "path": request.path, "status": 401, "error": type(error).__name__})
            return web.json_response({"error": "invalid token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return await handler(request)

    return authenticate


def route_template(request: Any) -> str:
    """The path template of the route a request matched (``/``, ``/dead-letter``, ``/{config_name}``), or ""."""
    resource = request.match_info.route.resource
    return (resource.canonical if resource is not None else "") or ""
