"""Checking a webhook delivery's signature on the receiving side (Standard Webhooks)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = ["verify_signature"]


def verify_signature(
    secret: str | list[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """Whether a webhook delivery was signed by Patinox with ``secret`` and is fresh.

    Checks ``webhook-signature`` (one or more space-separated ``v1,<base64>`` signatures,
    one per secret during a rotation) against HMAC-SHA256 of
    ``"{webhook-id}.{webhook-timestamp}.{body}"`` under the secret's bytes (the base64 after
    ``whsec_``), compared in constant time, and that ``webhook-timestamp`` (Unix seconds) is
    within ``tolerance_s`` seconds of ``now`` (a replayed delivery is refused). Use the
    raw body bytes as received, before any JSON parsing. Keep the ``webhook-id`` of the
    deliveries you processed to drop a retry of one that did arrive.

    Args:
        secret: the endpoint's secret (``whsec_...``), or several (the new and the
            previous one while you roll your own configuration over).
        headers: the request's headers (names in any case).
        body: the request's body, as received.
        tolerance_s: the largest age (or skew into the future) accepted, seconds.
        now: the present, Unix seconds (default: the clock).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, given = (
        lower.get("webhook-id"),
        lower.get("webhook-timestamp"),
        lower.get("webhook-signature"),
    )
    if not msg_id or not stamp or not given:
        return False
    try:
        sent_at = int(stamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent_at) > tolerance_s:
        return False
    signed = f"{msg_id}.{sent_at}.".encode() + body
    expected = []
    for s in [secret] if isinstance(secret, str) else secret:
        try:
            key = base64.b64decode(s.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            continue
        expected.append(base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii"))
    for part in given.split():
        version, _, value = part.partition(",")
        if version == "v1" and any(hmac.compare_digest(value, e) for e in expected):
            return True
    return False
