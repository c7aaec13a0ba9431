"""The URL guard's allow-list, block by block of IANA's special-purpose
registries: an address in each block gets the registry's verdict, directly
and in every IPv6 form that carries an IPv4 address. Pure computation: no
connection is made."""

from __future__ import annotations

import ipaddress

import pytest

from segq.global_addresses import (
    SPECIAL_PURPOSE_BLOCKS,
    IpAddress,
    embedded_ipv4,
    most_specific_block,
)
from segq.url_guard import FetchPolicy, UrlRefused, address_allowed, check_url, parse_networks

PRODUCTION = FetchPolicy(max_bytes=1)  # nothing allowed beyond the public internet

#: One address in each block of the registries, the block it falls in
#: (written out here, not read from the table, so an edit to the table
#: shows), and whether it may be fetched.
REGISTRY_SAMPLES: list[tuple[str, str, bool]] = [
    ("0.1.2.3", "0.0.0.0/8", False),
    ("0.0.0.0", "0.0.0.0/32", False),
    ("10.1.2.3", "10.0.0.0/8", False),
    ("100.100.1.1", "100.64.0.0/10", False),
    ("127.10.0.1", "127.0.0.0/8", False),
    ("169.254.169.254", "169.254.0.0/16", False),
    ("172.31.255.254", "172.16.0.0/12", False),
    ("192.0.0.200", "192.0.0.0/24", False),
    ("192.0.0.1", "192.0.0.0/29", False),
    ("192.0.0.8", "192.0.0.8/32", False),
    ("192.0.0.9", "192.0.0.9/32", True),
    ("192.0.0.10", "192.0.0.10/32", True),
    ("192.0.0.170", "192.0.0.170/32", False),
    ("192.0.0.171", "192.0.0.171/32", False),
    ("192.0.2.1", "192.0.2.0/24", False),
    ("192.31.196.1", "192.31.196.0/24", True),
    ("192.52.193.1", "192.52.193.0/24", True),
    ("192.88.99.1", "192.88.99.0/24", False),
    ("192.88.99.2", "192.88.99.2/32", False),
    ("192.168.1.1", "192.168.0.0/16", False),
    ("192.175.48.6", "192.175.48.0/24", True),
    ("198.19.255.1", "198.18.0.0/15", False),
    ("198.51.100.7", "198.51.100.0/24", False),
    ("203.0.113.7", "203.0.113.0/24", False),
    ("250.1.2.3", "240.0.0.0/4", False),
    ("255.255.255.255", "255.255.255.255/32", False),
    ("::1", "::1/128", False),
    ("::", "::/128", False),
    ("::ffff:8.8.8.8", "::ffff:0:0/96", False),
    ("64:ff9b::808:808", "64:ff9b::/96", True),
    ("64:ff9b:1::808:808", "64:ff9b:1::/48", False),
    ("100::1", "100::/64", False),
    ("100:0:0:1::1", "100:0:0:1::/64", False),
    ("2001:100::1", "2001::/23", False),
    # Teredo: server 65.54.227.120, client 8.8.4.4 (stored inverted).
    ("2001:0:4136:e378:8000:63bf:f7f7:fbfb", "2001::/32", True),
    ("2001:1::1", "2001:1::1/128", True),
    ("2001:1::2", "2001:1::2/128", True),
    ("2001:1::3", "2001:1::3/128", True),
    ("2001:2::1", "2001:2::/48", False),
    ("2001:3::1", "2001:3::/32", True),
    ("2001:4:112::1", "2001:4:112::/48", True),
    ("2001:10::1", "2001:10::/28", False),
    ("2001:20::1", "2001:20::/28", True),
    ("2001:30::1", "2001:30::/28", True),
    ("2001:db8::1", "2001:db8::/32", False),
    ("2002:808:808::1", "2002::/16", True),
    ("2620:4f:8000::1", "2620:4f:8000::/48", True),
    ("3fff::1", "3fff::/20", False),
    ("5f00::1", "5f00::/16", False),
    ("fd00:ec2::254", "fc00::/7", False),
    ("fe80::1", "fe80::/10", False),
]

#: Outside the special-purpose registries.
UNLISTED: list[tuple[str, bool]] = [
    ("8.8.8.8", True),
    ("1.1.1.1", True),
    ("93.184.216.34", True),
    ("224.0.0.1", False),  # multicast
    ("239.255.255.250", False),
    ("2606:4700:4700::1111", True),
    ("2001:4860:4860::8888", True),
    ("ff02::1", False),  # multicast
    ("ff0e::1", False),
    ("4000::1", False),  # outside 2000::/3
    ("::7f00:1", False),  # IPv4-compatible, not a registry block of its own
    ("::ffff:0:7f00:1", False),  # SIIT
]


def ip(text: str) -> IpAddress:
    return ipaddress.ip_address(text)


def test_every_block_of_the_table_has_a_sample() -> None:
    sampled = {ipaddress.ip_network(block) for _, block, _ in REGISTRY_SAMPLES}
    assert sampled == {block.network for block in SPECIAL_PURPOSE_BLOCKS}


@pytest.mark.parametrize(
    ("address", "block", "allowed"), REGISTRY_SAMPLES, ids=[b for _, b, _ in REGISTRY_SAMPLES]
)
def test_each_registry_block_gets_its_verdict(address: str, block: str, allowed: bool) -> None:
    found = most_specific_block(ip(address))
    assert found is not None and found.network == ipaddress.ip_network(block)
    assert address_allowed(ip(address), PRODUCTION) is allowed
    url = f"http://[{address}]/" if ":" in address else f"http://{address}/"
    if allowed:
        check_url(url, PRODUCTION)
    else:
        with pytest.raises(UrlRefused):
            check_url(url, PRODUCTION)


@pytest.mark.parametrize(("address", "allowed"), UNLISTED, ids=[a for a, _ in UNLISTED])
def test_addresses_outside_the_registries(address: str, allowed: bool) -> None:
    assert address_allowed(ip(address), PRODUCTION) is allowed


def embeddings(v4: str) -> dict[str, str]:
    """``v4`` in every IPv6 form that carries an IPv4 address."""
    value = int(ipaddress.IPv4Address(v4))
    high, low = value >> 16, value & 0xFFFF
    inverted = value ^ 0xFFFF_FFFF
    return {
        "mapped": f"::ffff:{v4}",
        "compatible": f"::{v4}",
        "siit": f"::ffff:0:{v4}",
        "nat64": f"64:ff9b::{v4}",
        "nat64-local-use": f"64:ff9b:1::{v4}",
        "6to4": f"2002:{high:x}:{low:x}::",
        "6to4-host": f"2002:{high:x}:{low:x}:1::1",
        # Server 65.54.227.120 (global) and this client; this server and client 8.8.4.4.
        "teredo-client": f"2001:0:4136:e378:8000:63bf:{inverted >> 16:x}:{inverted & 0xFFFF:x}",
        "teredo-server": f"2001:0:{high:x}:{low:x}:8000:63bf:f7f7:fbfb",
        "isatap": f"2001:4860:1::5efe:{v4}",
        "isatap-global": f"2001:4860:1::200:5efe:{v4}",
    }


#: Forms outside 2000::/3 (and the local-use NAT64 block): refused whatever
#: the IPv4 address they carry.
NEVER_ALLOWED_FORMS = {"mapped", "compatible", "siit", "nat64-local-use"}

NOT_GLOBAL_IPV4 = [a for a, _, allowed in REGISTRY_SAMPLES if not allowed and ":" not in a] + [
    "224.0.0.1",
    "127.0.0.1",
]
GLOBAL_IPV4 = [a for a, _, allowed in REGISTRY_SAMPLES if allowed and ":" not in a] + ["8.8.8.8"]


@pytest.mark.parametrize("v4", NOT_GLOBAL_IPV4)
def test_a_refused_ipv4_address_is_refused_in_every_ipv6_form(v4: str) -> None:
    for form, address in embeddings(v4).items():
        if form != "nat64-local-use":  # refused as a block, not unwrapped
            assert ipaddress.IPv4Address(v4) in embedded_ipv4(ip(address)), form
        assert not address_allowed(ip(address), PRODUCTION), (form, address)
        with pytest.raises(UrlRefused):
            check_url(f"http://[{address}]:8080/x", PRODUCTION)


@pytest.mark.parametrize("v4", GLOBAL_IPV4)
def test_a_global_ipv4_address_passes_in_the_forms_that_reach_it(v4: str) -> None:
    for form, address in embeddings(v4).items():
        assert address_allowed(ip(address), PRODUCTION) is (form not in NEVER_ALLOWED_FORMS), (
            form,
            address,
        )


def test_allowed_networks_admit_the_same_socket_only() -> None:
    loopback = FetchPolicy(max_bytes=1, allowed_networks=parse_networks("127.0.0.1/32"))
    assert address_allowed(ip("127.0.0.1"), loopback)
    assert address_allowed(ip("::ffff:127.0.0.1"), loopback)  # the kernel dials 127.0.0.1
    for relayed in ("64:ff9b::7f00:1", "2002:7f00:1::", "::7f00:1", "127.0.0.2"):
        assert not address_allowed(ip(relayed), loopback), relayed


def test_a_zone_id_does_not_change_the_verdict() -> None:
    assert not address_allowed(ip("fe80::1%eth0"), PRODUCTION)
    assert address_allowed(ip("2606:4700:4700::1111%eth0"), PRODUCTION)
