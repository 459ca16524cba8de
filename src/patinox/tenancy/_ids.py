"""Identifiers: time-ordered, random, prefixed, never reused."""

from __future__ import annotations

import os
import re
import time

#: Crockford's base32, lower case: its characters sort in ASCII order, so ids sort by time.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_ID_RE = re.compile(r"^[a-z]{2,4}_[0-9a-hjkmnp-tv-z]{26}$")


def new_id(prefix: str) -> str:
    """A new id ``<prefix>_<26 base32 chars>``: 48-bit millisecond time + 80 random bits.

    Time-ordered (as text too: Crockford base32 sorts like the number it encodes), so
    indexes stay append-mostly and ``ORDER BY id`` is creation order to the millisecond;
    80 random bits make a collision within one millisecond negligible, and the tenants
    table keeps deleted ids as tombstones, so a tenant id is never reused.
    """
    value = ((int(time.time() * 1000) & (2**48 - 1)) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return f"{prefix}_{''.join(reversed(chars))}"


def looks_like_id(value: str) -> bool:
    """True when ``value`` has the shape of an id made by :func:`new_id`."""
    return bool(_ID_RE.match(value))
