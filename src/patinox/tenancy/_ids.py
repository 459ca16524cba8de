"""Identifiers: time-ordered, random, prefixed, never reused."""

from __future__ import annotations

import base64
import os
import re
import time

#: Crockford's base32, lower case: its characters sort in ASCII order, so ids sort by time.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
#: RFC 4648 base32 digit -> the Crockford digit of the same value.
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())
_ID_RE = re.compile(r"^[a-z]{2,4}_[0-9a-hjkmnp-tv-z]{26}$")


def new_id(prefix: str) -> str:
    """A new id ``<prefix>_<26 base32 chars>``: 48-bit millisecond time + 80 random bits.

    Time-ordered (as text too: Crockford base32 sorts like the number it encodes), so
    indexes stay append-mostly and ``ORDER BY id`` is creation order to the millisecond;
    80 random bits make a collision within one millisecond negligible, and the tenants
    table keeps deleted ids as tombstones, so a tenant id is never reused.
    """
    value = ((int(time.time() * 1000) & (2**48 - 1)) << 80) | int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_base32_26(value)}"


def _base32_26(value: int) -> str:
    """The 26 base32 digits (most significant first) of a number below 2**130.

    RFC 4648 base32 of the number shifted to fill 160 bits, first 26 digits, mapped to the
    Crockford alphabet: the same digits as repeated ``divmod`` by 32, in a few
    microseconds instead of tens.
    """
    digits = base64.b32encode((value << 30).to_bytes(20, "big"))[:26]
    return digits.translate(_FROM_RFC4648).decode("ascii")


def looks_like_id(value: str) -> bool:
    """True when ``value`` has the shape of an id made by :func:`new_id`."""
    return bool(_ID_RE.match(value))
