"""Attacks on network and configuration isolation: the egress guard's address checks, key
lifetimes minted through the tenant key API, and the model allow-list's default model.

Each test is an attack that worked before its fix (or one that must keep failing): an
``http_fetch`` URL whose IPv6 address carries an internal IPv4 address a translator
(NAT64, 6to4, SIIT, the old IPv4-compatible form) delivers to; a short-lived key that
mints or rotates into a key living for ever; an operator narrowing a tenant's models
while its default model stays outside them.
"""

from __future__ import annotations

import asyncio

import pytest

from patinox.errors import EgressRefused
from patinox.network import OutboundGuard, OutboundPolicy

# --- egress: IPv6 forms of internal IPv4 addresses ---------------------------------------

#: IPv6 literals that name loopback, the metadata address or a private address through a
#: translation prefix, and the standard that defines it.
EMBEDDED = [
    "::7f00:1",  # IPv4-compatible ::127.0.0.1 (RFC 4291, deprecated)
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT, RFC 2765)
    "64:ff9b::a9fe:a9fe",  # NAT64 well-known prefix (RFC 6052) to 169.254.169.254
    "64:ff9b::a00:1",  # NAT64 to 10.0.0.1
    "64:ff9b:1::7f00:1",  # NAT64 local-use prefix (RFC 8215)
    "2002:a9fe:a9fe::1",  # 6to4 (RFC 3056) of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "fec0::1",  # site-local (RFC 3879, deprecated): a private range
]


@pytest.mark.parametrize("address", EMBEDDED)
def test_egress_refuses_ipv6_addresses_that_carry_an_internal_ipv4_address(address: str) -> None:
    guard = OutboundGuard(OutboundPolicy(allowed_hosts=None, schemes=frozenset({"http", "https"})))
    with pytest.raises(EgressRefused) as caught:
        asyncio.run(guard.check(f"http://[{address}]:5432/"))
    assert caught.value.fields["reason"] == "address_not_allowed"


def test_egress_still_reaches_a_public_ipv4_address_through_nat64() -> None:
    """An IPv6-only deployment reaches public IPv4 hosts through NAT64; only the internal
    ones are refused."""
    guard = OutboundGuard(OutboundPolicy(allowed_hosts=None))
    target = asyncio.run(guard.check("https://[64:ff9b::5db8:d822]/"))  # 93.184.216.34
    assert str(target.address) == "64:ff9b::5db8:d822"
