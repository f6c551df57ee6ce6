"""Which S3 endpoints a workflow message may make the platform talk to (server-side request forgery guard).

``S3_bucket.endpoint_url`` comes from a message, so it is checked before any request is sent to it:

1. scheme: ``https`` only (``http`` too when ``allow_http`` is set: the local platform); ``file:``, ``ftp:`` ... never;
2. no userinfo (``user:password@``): credentials belong in the Secret, not in a URL that is stored and logged;
3. no numeric host spelled unusually (``2130706433``, ``0x7f.1``, ``0177.0.0.1``): resolvers read them as IPs;
4. the allowlist (``allowed_endpoints``: ``scheme://host[:port]``, ``*.`` prefix for subdomains), when set;
5. every address the host resolves to (DNS, now), by the table of special-purpose ranges (address_classes.py):
   never link-local (169.254.0.0/16 cloud metadata, fe80::/10, fd00:ec2::/32), unspecified, multicast, reserved,
   CGNAT, documentation, benchmarking, 6to4, Teredo, site-local ...; IPv4-mapped and NAT64 addresses judged by the
   IPv4 address they carry; loopback and private ranges (RFC 1918, fc00::/7) and the configured pod/service CIDRs
   only when ``allow_private`` is set (the local platform, whose S3 is on loopback).

``guarded_s3_client_hooks`` then pins the client to that endpoint: botocore never follows an HTTP redirect itself,
and any request to another host (S3's region redirector rewriting the URL after a 301) is refused before it is sent;
the Wrapper's client also connects only to ``CheckedEndpoint.addresses`` (services/wrapper/inputs/s3_pinning.py).

A refusal (``EndpointRefused``) names the rule and the host, never the URL's userinfo, path or query.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from .address_classes import AddressUse, address_class, embedded_ipv4
from .settings import ENV_PREFIX, ServiceSettings, comma_or_json_list

_DOTTED_DECIMAL = re.compile(r"^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$")
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]*))*\.?$", re.IGNORECASE)

Resolver = Callable[[str, int], Iterable[str]]


class EndpointPolicySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}S3_POLICY_", extra="ignore")

    # ``scheme://host[:port]`` entries, comma-separated or JSON; ``https://*.example.org`` admits subdomains.
    # Empty: any endpoint that passes the other rules.
    allowed_endpoints: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allow_http: bool = False
    allow_private: bool = False
    # The cluster's pod and service ranges (refused unless allow_private).
    denied_cidrs: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("allowed_endpoints", "denied_cidrs", mode="before")
    @classmethod
    def _list(cls, value: object) -> object:
        return comma_or_json_list(value)


class EndpointRefused(ValueError):
    """An endpoint the policy refuses; ``rule`` names the rule, the message is safe to log and to notify."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"S3 endpoint refused ({rule}): {detail}")
        self.rule = rule


@dataclass(frozen=True)
class CheckedEndpoint:
    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def system_resolver(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def _parts(url: str) -> SplitResult:
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise EndpointRefused("malformed", "not a URL") from None
    return parts


def _ip_literal(host: str) -> str | None:
    """The address when ``host`` is an IP literal (an IPv6 zone, ``%eth0``, dropped), else None."""
    candidate = host.strip("[]").split("%", 1)[0]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


class S3EndpointPolicy:
    def __init__(self, allowed_endpoints: Iterable[str] = (), *, allow_http: bool = False,
                 allow_private: bool = False, denied_cidrs: Iterable[str] = (),
                 resolver: Resolver = system_resolver) -> None:
        self.allowed = [self._allow_entry(entry) for entry in allowed_endpoints if entry]
        self.allow_http = allow_http
        self.allow_private = allow_private
        self.denied = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in denied_cidrs)
        self.resolver = resolver

    @classmethod
    def from_settings(cls, settings: EndpointPolicySettings | None = None, **overrides: Any) -> "S3EndpointPolicy":
        settings = settings or EndpointPolicySettings()
        return cls(settings.allowed_endpoints, allow_http=settings.allow_http, allow_private=settings.allow_private,
                   denied_cidrs=settings.denied_cidrs, **overrides)

    @staticmethod
    def _allow_entry(entry: str) -> tuple[str, str, int | None]:
        parts = urlsplit(entry if "://" in entry else f"https://{entry}")
        return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port

    def _default_port(self, scheme: str) -> int:
        return 443 if scheme == "https" else 80

    def check_syntax(self, url: str) -> tuple[str, str, int]:
        """The rules that need no DNS: scheme, userinfo, host spelling, allowlist. Returns (scheme, host, port)."""
        parts = _parts(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise EndpointRefused("scheme", f"{scheme or 'no'} scheme; only https"
                                  + (" or http" if self.allow_http else "") + " is allowed")
        if scheme == "http" and not self.allow_http:
            raise EndpointRefused("scheme", "plain http is not allowed; use https")
        if "@" in parts.netloc:
            raise EndpointRefused("userinfo", "credentials in the endpoint URL are not allowed")
        host = (parts.hostname or "").lower()
        if not host:
            raise EndpointRefused("host", "no host")
        if _NUMERIC_HOST.match(host) and not _DOTTED_DECIMAL.match(host):
            raise EndpointRefused("ip-spelling", f"host {host[:64]!r} is a numeric address in non-canonical form")
        port = parts.port or self._default_port(scheme)
        if self.allowed and not any(self._matches(entry, scheme, host, port) for entry in self.allowed):
            raise EndpointRefused("allowlist", f"host {host!r} is not an allowed S3 endpoint")
        return scheme, host, port

    def _matches(self, entry: tuple[str, str, int | None], scheme: str, host: str, port: int) -> bool:
        allowed_scheme, allowed_host, allowed_port = entry
        if allowed_scheme != scheme or (allowed_port or self._default_port(allowed_scheme)) != port:
            return False
        if allowed_host.startswith("*."):
            return host.endswith(allowed_host[1:])
        return host == allowed_host

    def check_address(self, address: str, host: str) -> None:
        """The address rules, from the table of special-purpose ranges (services/core/address_classes.py); Python's
        own classification (``is_reserved``, ``is_private`` ...) refuses whatever the table does not name."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        row = address_class(ip)
        if row is not None and row.use is AddressUse.EMBEDS_IPV4 and isinstance(ip, ipaddress.IPv6Address):
            self.check_address(str(embedded_ipv4(ip)), host)
            return
        use = row.use if row is not None else None
        what = row.name if row is not None else "a reserved address"
        if use is AddressUse.NEVER or ip.is_link_local or ip.is_multicast or ip.is_unspecified \
                or (ip.is_reserved and use is not AddressUse.LOOPBACK):
            raise EndpointRefused("link-local-or-reserved", f"host {host!r} resolves to {what}")
        if self.allow_private:
            return
        if use is AddressUse.LOOPBACK:
            raise EndpointRefused("loopback", f"host {host!r} resolves to a loopback address")
        if use is AddressUse.PRIVATE or ip.is_private:
            raise EndpointRefused("private", f"host {host!r} resolves to a private address")
        if any(ip.version == network.version and ip in network for network in self.denied):
            raise EndpointRefused("cluster-network", f"host {host!r} resolves into the cluster's pod or service "
                                                     "range")

    def check_without_dns(self, url: str) -> tuple[str, str, int]:
        """The rules that hold whatever DNS answers later (the controller, when it accepts a message): syntax,
        allowlist, and the address rules when the host is an IP literal. The Wrapper runs ``check`` before use."""
        scheme, host, port = self.check_syntax(url)
        literal = _ip_literal(host)
        if literal is not None:
            self.check_address(literal, host)
        return scheme, host, port

    def check(self, url: str) -> CheckedEndpoint:
        """Every rule, DNS included. Raises ``EndpointRefused``."""
        scheme, host, port = self.check_syntax(url)
        literal = _ip_literal(host)
        try:
            addresses = (literal,) if literal is not None else tuple(self.resolver(host, port))
        except (OSError, UnicodeError):
            raise EndpointRefused("dns", f"host {host!r} does not resolve") from None
        if not addresses:
            raise EndpointRefused("dns", f"host {host!r} does not resolve")
        for address in addresses:
            self.check_address(address, host)
        return CheckedEndpoint(url=url, scheme=scheme, host=host, port=port, addresses=addresses)


def guarded_s3_client_hooks(client: Any, endpoint: CheckedEndpoint | None) -> Any:
    """Pin a botocore client to the checked endpoint: a request to any other host is refused before it is sent.

    botocore sends with redirects off (its urllib3 session never follows a 3xx); what could re-target a request is
    S3's region redirector, which rewrites the URL after a 301/400 and retries: this hook stops that too."""
    if endpoint is None:
        return client

    def refuse_other_hosts(request: Any, **_kwargs: Any) -> None:
        target = urlsplit(request.url)
        if (target.hostname or "").lower() != endpoint.host or \
                (target.port or (443 if target.scheme == "https" else 80)) != endpoint.port:
            raise EndpointRefused("redirect", f"request re-targeted away from host {endpoint.host!r}")

    client.meta.events.register_first("before-send.s3", refuse_other_hosts)
    return client
