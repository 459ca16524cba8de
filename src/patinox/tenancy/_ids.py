"""Identifiers: time-ordered, random, prefixed, never reused."""

from __future__ import annotations

import base64
import os
import re
import time

_ID_RE = re.compile(r"^[a-z]{2,4}_[a-z2-7]{26}$")


def new_id(prefix: str) -> str:
    """A new id ``<prefix>_<26 base32 chars>``: 48-bit millisecond time + 80 random bits.

    Time-ordered so indexes stay append-mostly; 80 random bits make a collision within one
    millisecond negligible, and the tenants table keeps deleted ids as tombstones, so a
    tenant id is never reused.
    """
    raw = (int(time.time() * 1000) & (2**48 - 1)).to_bytes(6, "big") + os.urandom(10)
    return f"{prefix}_{base64.b32encode(raw).decode().lower().rstrip('=')}"


def looks_like_id(value: str) -> bool:
    """True when ``value`` has the shape of an id made by :func:`new_id`."""
    return bool(_ID_RE.match(value))
