"""Special-purpose IP address ranges, as one table the S3 endpoint policy reads (services/core/s3_endpoint_policy.py).

Sources: the IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and the RFCs each row names), plus the
cloud metadata range AWS uses over IPv6. Each row says how an S3 endpoint resolving into it is treated:

- ``NEVER``: no S3 endpoint has such an address; refused whatever the local flags (metadata, link-local,
  documentation, benchmarking, CGNAT, multicast, tunnels that carry traffic to an IPv4 address elsewhere ...);
- ``LOOPBACK`` / ``PRIVATE``: refused unless the policy allows private addresses (the local platform);
- ``EMBEDS_IPV4``: the address carries an IPv4 address in its low 32 bits (IPv4-mapped, NAT64's well-known prefix
  that DNS64 synthesises for IPv4-only hosts): that IPv4 address is judged instead.

6to4 (2002::/16) and Teredo (2001::/32, client address obfuscated) also carry IPv4 addresses, but through relays
anywhere on the internet: they are ``NEVER``, whatever they embed. The most specific row wins (``fd00:ec2::/32`` is
``NEVER`` inside ``fc00::/7``, ``::1`` is ``LOOPBACK`` inside ``::/96``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressUse(Enum):
    NEVER = "never"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    EMBEDS_IPV4 = "embeds-ipv4"


@dataclass(frozen=True)
class AddressClass:
    network: IPNetwork
    name: str
    use: AddressUse


def _row(cidr: str, name: str, use: AddressUse) -> AddressClass:
    return AddressClass(ipaddress.ip_network(cidr), name, use)


NEVER, LOOPBACK, PRIVATE, EMBEDS_IPV4 = AddressUse.NEVER, AddressUse.LOOPBACK, AddressUse.PRIVATE, AddressUse.EMBEDS_IPV4

ADDRESS_CLASSES: tuple[AddressClass, ...] = (
    # IPv4
    _row("0.0.0.0/8", "'this network' (RFC 791)", NEVER),
    _row("10.0.0.0/8", "a private address (RFC 1918)", PRIVATE),
    _row("100.64.0.0/10", "carrier-grade NAT space (RFC 6598)", NEVER),
    _row("127.0.0.0/8", "a loopback address", LOOPBACK),
    _row("169.254.0.0/16", "a link-local address (cloud metadata)", NEVER),
    _row("172.16.0.0/12", "a private address (RFC 1918)", PRIVATE),
    _row("192.0.0.0/24", "IETF protocol assignments (RFC 6890)", NEVER),
    _row("192.0.2.0/24", "documentation space TEST-NET-1 (RFC 5737)", NEVER),
    _row("192.31.196.0/24", "AS112-v4 (RFC 7535)", NEVER),
    _row("192.52.193.0/24", "AMT relays (RFC 7450)", NEVER),
    _row("192.88.99.0/24", "the 6to4 relay anycast (RFC 7526)", NEVER),
    _row("192.168.0.0/16", "a private address (RFC 1918)", PRIVATE),
    _row("192.175.48.0/24", "AS112 direct delegation (RFC 7534)", NEVER),
    _row("198.18.0.0/15", "benchmarking space (RFC 2544)", NEVER),
    _row("198.51.100.0/24", "documentation space TEST-NET-2 (RFC 5737)", NEVER),
    _row("203.0.113.0/24", "documentation space TEST-NET-3 (RFC 5737)", NEVER),
    _row("224.0.0.0/4", "a multicast address", NEVER),
    _row("240.0.0.0/4", "reserved space and the broadcast address (RFC 1112, RFC 919)", NEVER),
    # IPv6
    _row("::/128", "the unspecified address", NEVER),
    _row("::1/128", "a loopback address", LOOPBACK),
    _row("::/96", "an IPv4-compatible address (deprecated, RFC 4291)", NEVER),
    _row("::ffff:0:0/96", "an IPv4-mapped address", EMBEDS_IPV4),
    _row("64:ff9b::/96", "a NAT64 address (RFC 6052)", EMBEDS_IPV4),
    _row("64:ff9b:1::/48", "a local-use NAT64 address (RFC 8215)", NEVER),
    _row("100::/64", "discard-only space (RFC 6666)", NEVER),
    _row("2001::/23", "IETF protocol assignments (RFC 2928)", NEVER),
    _row("2001::/32", "a Teredo address (RFC 4380)", NEVER),
    _row("2001:2::/48", "benchmarking space (RFC 5180)", NEVER),
    _row("2001:db8::/32", "documentation space (RFC 3849)", NEVER),
    _row("2002::/16", "a 6to4 address (RFC 3056)", NEVER),
    _row("3fff::/20", "documentation space (RFC 9637)", NEVER),
    _row("5f00::/16", "SRv6 segment identifiers (RFC 9602)", NEVER),
    _row("fc00::/7", "a unique local address (RFC 4193)", PRIVATE),
    _row("fd00:ec2::/32", "the AWS IPv6 metadata range", NEVER),
    _row("fe80::/10", "a link-local address", NEVER),
    _row("fec0::/10", "a site-local address (deprecated, RFC 3879)", NEVER),
    _row("ff00::/8", "a multicast address", NEVER),
)


def address_class(ip: IPAddress) -> AddressClass | None:
    """The most specific row holding ``ip``, or None for an ordinary (global unicast) address."""
    rows = [row for row in ADDRESS_CLASSES if row.network.version == ip.version and ip in row.network]
    return max(rows, key=lambda row: row.network.prefixlen, default=None)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    """The IPv4 address in the low 32 bits (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``)."""
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
