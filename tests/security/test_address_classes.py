"""Every row of the special-purpose address table (services/core/address_classes.py) is refused as an S3 endpoint
with an empty allowlist: as an IP literal in the URL (what the controller checks at intake) and as the DNS answer for
a name (what the Wrapper checks before it connects). Tunnel and translation forms carry denied IPv4 addresses:
``2002:a9fe:a9fe::`` is 6to4 for 169.254.169.254, ``64:ff9b::a9fe:a9fe`` its NAT64 form, ``::ffff:a9fe:a9fe`` its
IPv4-mapped form, ``2001:0:a9fe:a9fe::5601:5601`` a Teredo address whose obfuscated client is 169.254.169.254.

Each table row has its own cases (the test checks that none is missing); ``NEVER`` rows are refused even where
loopback and private addresses are allowed (the local platform)."""

from __future__ import annotations

import ipaddress

import pytest

from services.core.address_classes import ADDRESS_CLASSES, AddressUse, address_class
from services.core.s3_endpoint_policy import EndpointRefused, S3EndpointPolicy

REFUSED = "link-local-or-reserved"

# table row -> (address, the rule that refuses it): the cases of each row.
CASES: dict[str, list[tuple[str, str]]] = {
    "0.0.0.0/8": [("0.0.0.1", REFUSED)],
    "10.0.0.0/8": [("10.1.2.3", "private")],
    "100.64.0.0/10": [("100.64.0.1", REFUSED), ("100.127.255.254", REFUSED)],
    "127.0.0.0/8": [("127.0.0.1", "loopback"), ("127.8.9.10", "loopback")],
    "169.254.0.0/16": [("169.254.169.254", REFUSED)],
    "172.16.0.0/12": [("172.31.255.1", "private")],
    "192.0.0.0/24": [("192.0.0.8", REFUSED)],
    "192.0.2.0/24": [("192.0.2.10", REFUSED)],
    "192.31.196.0/24": [("192.31.196.1", REFUSED)],
    "192.52.193.0/24": [("192.52.193.1", REFUSED)],
    "192.88.99.0/24": [("192.88.99.1", REFUSED)],
    "192.168.0.0/16": [("192.168.1.1", "private")],
    "192.175.48.0/24": [("192.175.48.1", REFUSED)],
    "198.18.0.0/15": [("198.18.0.1", REFUSED), ("198.19.255.254", REFUSED)],
    "198.51.100.0/24": [("198.51.100.7", REFUSED)],
    "203.0.113.0/24": [("203.0.113.9", REFUSED)],
    "224.0.0.0/4": [("224.0.0.251", REFUSED), ("239.255.255.250", REFUSED)],
    "240.0.0.0/4": [("240.0.0.1", REFUSED), ("255.255.255.255", REFUSED)],
    "::/128": [("::", REFUSED)],
    "::1/128": [("::1", "loopback")],
    "::/96": [("::a9fe:a9fe", REFUSED), ("::7f00:1", REFUSED), ("::a00:1", REFUSED)],
    "::ffff:0:0/96": [("::ffff:169.254.169.254", REFUSED), ("::ffff:127.0.0.1", "loopback"),
                      ("::ffff:10.0.0.1", "private"), ("::ffff:100.64.0.1", REFUSED)],
    "64:ff9b::/96": [("64:ff9b::a9fe:a9fe", REFUSED), ("64:ff9b::7f00:1", "loopback"),
                     ("64:ff9b::a00:1", "private"), ("64:ff9b::c0a8:101", "private")],
    "64:ff9b:1::/48": [("64:ff9b:1::a9fe:a9fe", REFUSED), ("64:ff9b:1:ffff::34db:aa0a", REFUSED)],
    "100::/64": [("100::1", REFUSED)],
    "2001::/23": [("2001:1::1", REFUSED), ("2001:4:112::1", REFUSED)],
    "2001::/32": [("2001:0:a9fe:a9fe::5601:5601", REFUSED), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", REFUSED)],
    "2001:2::/48": [("2001:2::1", REFUSED)],
    "2001:db8::/32": [("2001:db8::1", REFUSED)],
    "2002::/16": [("2002:a9fe:a9fe::", REFUSED), ("2002:7f00:1::", REFUSED), ("2002:a00:1::", REFUSED),
                  ("2002:34db:aa0a::1", REFUSED)],
    "3fff::/20": [("3fff::1", REFUSED)],
    "5f00::/16": [("5f00::1", REFUSED)],
    "fc00::/7": [("fc00::1", "private"), ("fdab:cdef::1", "private")],
    "fd00:ec2::/32": [("fd00:ec2::254", REFUSED)],
    "fe80::/10": [("fe80::1", REFUSED)],
    "fec0::/10": [("fec0::1", REFUSED), ("feff::1", REFUSED)],
    "ff00::/8": [("ff02::1", REFUSED)],
}

ROWS = {str(row.network): row for row in ADDRESS_CLASSES}
PARAMS = [pytest.param(cidr, address, rule, id=f"{cidr} {address}")
          for cidr, cases in CASES.items() for address, rule in cases]


def test_every_row_of_the_table_has_cases() -> None:
    assert set(CASES) == set(ROWS)


def literal(address: str) -> str:
    return f"https://[{address}]/" if ":" in address else f"https://{address}/"


def resolving_to(address: str) -> S3EndpointPolicy:
    return S3EndpointPolicy(resolver=lambda _host, _port: [address])


@pytest.mark.parametrize("cidr, address, rule", PARAMS)
def test_each_range_is_refused_with_an_empty_allowlist(cidr: str, address: str, rule: str) -> None:
    ip = ipaddress.ip_address(address)
    assert address_class(ip) == ROWS[cidr]  # the case exercises its row, not a more specific one
    for check in (lambda: S3EndpointPolicy().check(literal(address)),
                  lambda: S3EndpointPolicy().check_without_dns(literal(address)),
                  lambda: resolving_to(address).check("https://s3.example.test")):
        with pytest.raises(EndpointRefused) as refused:
            check()
        assert refused.value.rule == rule, (address, str(refused.value))
    if ROWS[cidr].use is AddressUse.NEVER:
        # Not even the local platform (loopback and private allowed) talks to these.
        with pytest.raises(EndpointRefused):
            S3EndpointPolicy(allow_http=True, allow_private=True).check(literal(address))
        assert ROWS[cidr].name in str(refused.value)


@pytest.mark.parametrize("address", [
    "52.219.170.10",                   # AWS S3 (eu-central-1)
    "2600:1f18:4a3b::1",                # AWS global unicast IPv6
    "::ffff:52.219.170.10",             # IPv4-mapped public address
    "64:ff9b::34db:aa0a",               # DNS64/NAT64 form of the same: how IPv6-only clusters reach IPv4 S3
])
def test_public_addresses_and_their_translations_pass(address: str) -> None:
    assert resolving_to(address).check("https://s3.example.test").addresses == (address,)
