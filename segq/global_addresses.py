"""Which IP addresses are globally reachable unicast: the only ones a URL
that a client gives may lead to.

Decided from IANA's special-purpose registries, not from Python's
``ipaddress.is_global``, which in the Pythons this project runs calls
IPv4-compatible (``::127.0.0.1``), SIIT (``::ffff:0:127.0.0.1``) and
local-use NAT64 (``64:ff9b:1::/48``) addresses global. An IPv6 address that
carries an IPv4 one (mapped, compatible, SIIT, NAT64, 6to4, Teredo, ISATAP)
is refused unless that IPv4 address is itself allowed, whichever the form.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SpecialBlock:
    network: IpNetwork
    name: str
    #: The registry's "Globally Reachable" column; None where it says N/A.
    globally_reachable: bool | None


def _block(network: str, name: str, globally_reachable: bool | None) -> SpecialBlock:
    return SpecialBlock(ipaddress.ip_network(network), name, globally_reachable)


#: IANA IPv4 Special-Purpose Address Registry and IPv6 Special-Purpose
#: Address Registry (RFC 6890 and their later additions), with each entry's
#: "Globally Reachable" column, as published at
#: https://www.iana.org/assignments/iana-ipv4-special-registry/ and
#: https://www.iana.org/assignments/iana-ipv6-special-registry/, written out
#: by hand as the registries stood in 2025 (their latest entry here is RFC
#: 9780's, 100:0:0:1::/64); a block IANA adds later is allowed until it is
#: added here. The most specific block an address falls in decides:
#: 192.0.0.9 is global although 192.0.0.0/24 is not.
SPECIAL_PURPOSE_BLOCKS: tuple[SpecialBlock, ...] = (
    # IPv4
    _block("0.0.0.0/8", '"This network" (RFC 791)', False),
    _block("0.0.0.0/32", '"This host on this network" (RFC 1122)', False),
    _block("10.0.0.0/8", "Private-Use (RFC 1918)", False),
    _block("100.64.0.0/10", "Shared Address Space (RFC 6598)", False),
    _block("127.0.0.0/8", "Loopback (RFC 1122)", False),
    _block("169.254.0.0/16", "Link Local (RFC 3927)", False),
    _block("172.16.0.0/12", "Private-Use (RFC 1918)", False),
    _block("192.0.0.0/24", "IETF Protocol Assignments (RFC 6890)", False),
    _block("192.0.0.0/29", "IPv4 Service Continuity Prefix (RFC 7335)", False),
    _block("192.0.0.8/32", "IPv4 dummy address (RFC 7600)", False),
    _block("192.0.0.9/32", "Port Control Protocol Anycast (RFC 7723)", True),
    _block("192.0.0.10/32", "Traversal Using Relays around NAT Anycast (RFC 8155)", True),
    _block("192.0.0.170/32", "NAT64/DNS64 Discovery (RFC 8880)", False),
    _block("192.0.0.171/32", "NAT64/DNS64 Discovery (RFC 8880)", False),
    _block("192.0.2.0/24", "Documentation, TEST-NET-1 (RFC 5737)", False),
    _block("192.31.196.0/24", "AS112-v4 (RFC 7535)", True),
    _block("192.52.193.0/24", "AMT (RFC 7450)", True),
    _block("192.88.99.0/24", "Deprecated 6to4 Relay Anycast (RFC 7526)", None),
    _block("192.88.99.2/32", "6a44-relay anycast address (RFC 6751)", False),
    _block("192.168.0.0/16", "Private-Use (RFC 1918)", False),
    _block("192.175.48.0/24", "Direct Delegation AS112 Service (RFC 7534)", True),
    _block("198.18.0.0/15", "Benchmarking (RFC 2544)", False),
    _block("198.51.100.0/24", "Documentation, TEST-NET-2 (RFC 5737)", False),
    _block("203.0.113.0/24", "Documentation, TEST-NET-3 (RFC 5737)", False),
    _block("240.0.0.0/4", "Reserved (RFC 1112)", False),
    _block("255.255.255.255/32", "Limited Broadcast (RFC 919)", False),
    # IPv6
    _block("::1/128", "Loopback Address (RFC 4291)", False),
    _block("::/128", "Unspecified Address (RFC 4291)", False),
    _block("::ffff:0:0/96", "IPv4-mapped Address (RFC 4291)", False),
    _block("64:ff9b::/96", "IPv4-IPv6 Translation, well-known prefix (RFC 6052)", True),
    _block("64:ff9b:1::/48", "IPv4-IPv6 Translation, local use (RFC 8215)", False),
    _block("100::/64", "Discard-Only Address Block (RFC 6666)", False),
    _block("100:0:0:1::/64", "Dummy IPv6 Prefix (RFC 9780)", False),
    _block("2001::/23", "IETF Protocol Assignments (RFC 2928)", False),
    _block("2001::/32", "TEREDO (RFC 4380)", None),
    _block("2001:1::1/128", "Port Control Protocol Anycast (RFC 7723)", True),
    _block("2001:1::2/128", "Traversal Using Relays around NAT Anycast (RFC 8155)", True),
    _block("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast (RFC 9665)", True),
    _block("2001:2::/48", "Benchmarking (RFC 5180)", False),
    _block("2001:3::/32", "AMT (RFC 7450)", True),
    _block("2001:4:112::/48", "AS112-v6 (RFC 7535)", True),
    _block("2001:10::/28", "Deprecated, previously ORCHID (RFC 4843)", None),
    _block("2001:20::/28", "ORCHIDv2 (RFC 7343)", True),
    _block("2001:30::/28", "Drone Remote ID Protocol Entity Tags (RFC 9374)", True),
    _block("2001:db8::/32", "Documentation (RFC 3849)", False),
    _block("2002::/16", "6to4 (RFC 3056)", None),
    _block("2620:4f:8000::/48", "Direct Delegation AS112 Service (RFC 7534)", True),
    _block("3fff::/20", "Documentation (RFC 9637)", False),
    _block("5f00::/16", "Segment Routing (SRv6) SIDs (RFC 9602)", False),
    _block("fc00::/7", "Unique-Local (RFC 4193)", False),
    _block("fe80::/10", "Link-Local Unicast (RFC 4291)", False),
)

#: Outside the special-purpose registries: IPv4 multicast (IANA IPv4 Address
#: Space Registry, RFC 5771) is not unicast; IPv6 unicast that is global is
#: the Global Unicast block of the IANA IPv6 Address Space Registry.
IPV4_MULTICAST = ipaddress.IPv4Network("224.0.0.0/4")
IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")

#: IPv6 forms whose last 32 bits are an IPv4 address.
_LOW_32_EMBEDDINGS = (
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (RFC 4291, deprecated)
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped (RFC 4291)
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated, SIIT (RFC 2765)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
)
#: ISATAP interface identifier (RFC 5214): 0000:5efe or 0200:5efe (the u and
#: g bits may be set), then the IPv4 address, under any /64 prefix. A host on
#: the ISATAP link tunnels to that IPv4 address directly.
_ISATAP_MASK = 0xFCFF_FFFF
_ISATAP_ID = 0x0000_5EFE


def embedded_ipv4(address: IpAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """Every IPv4 address an IPv6 one carries, in any form this module knows.
    Local-use NAT64 (64:ff9b:1::/48) is not unwrapped: its operator picks
    where the IPv4 address sits, and the registry refuses the whole block."""
    if isinstance(address, ipaddress.IPv4Address):
        return ()
    value = int(address)
    found: list[ipaddress.IPv4Address] = []
    if any(address in network for network in _LOW_32_EMBEDDINGS):
        found.append(ipaddress.IPv4Address(value & 0xFFFF_FFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)  # the server, and the client behind its NAT
    if ((value >> 32) & _ISATAP_MASK) == _ISATAP_ID:
        found.append(ipaddress.IPv4Address(value & 0xFFFF_FFFF))
    return tuple(found)


def most_specific_block(address: IpAddress) -> SpecialBlock | None:
    """The narrowest registry block that holds ``address``, if any."""
    holding = [block for block in SPECIAL_PURPOSE_BLOCKS if address in block.network]
    return max(holding, key=lambda block: block.network.prefixlen, default=None)


def is_globally_reachable_unicast(address: IpAddress) -> bool:
    """True only for an address the registries leave globally reachable,
    unicast, and, for IPv6, inside 2000::/3 or the NAT64 well-known prefix,
    with every IPv4 address it carries passing the same test."""
    if isinstance(address, ipaddress.IPv4Address) and address in IPV4_MULTICAST:
        return False
    carried = embedded_ipv4(address)
    if not all(is_globally_reachable_unicast(inner) for inner in carried):
        return False
    block = most_specific_block(address)
    if block is not None:
        if block.globally_reachable is None:
            # N/A: 6to4 and Teredo reach the IPv4 address they carry, checked
            # above; a deprecated block without one reaches nothing.
            return bool(carried)
        return block.globally_reachable
    if isinstance(address, ipaddress.IPv6Address):
        return address in IPV6_GLOBAL_UNICAST
    return True
