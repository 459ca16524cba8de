"""``Idempotency-Key`` on the POSTs that create something (agents, runs, keys).

Follows draft-ietf-httpapi-idempotency-key-header: a client sends a unique key with a
request; a retry with the same key and the same request (method, path and body: the
request's fingerprint) is answered the first request's response (status and body, kept
sealed under the tenant's DEK, see :class:`~patinox.storage.IdempotencyRecords`) with
``Idempotent-Replayed: true``, and creates nothing again. The same key with another
request answers 422 ``idempotency_key_reused``; while the first request is still in
progress, 409 ``idempotency_in_progress``. Keys are per tenant and expire after 24 hours.
A key that is empty or longer than 255 characters answers 400
``invalid_idempotency_key``.

Which responses are kept: the one a request answered when it created something, its
refusals excepted. A request refused before it created anything (validation, a quota, a
rate limit, a name taken) gives its key back, so the client's retry with the same key is
tried anew; a synchronous run that ran and failed (502 ``run_failed``, with its
``run_id``) keeps that answer, since the run exists.

A replay counts against no rate limit or quota: it never reaches admission, and the
request middleware asks :func:`is_replay` before it counts the request against the
tenant's and the key's rates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from patinox.errors import (
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    RunFailed,
)
from patinox.storage import TenantStore

__all__ = ["HEADER", "MAX_KEY_LENGTH", "REQUEST_BODY", "Created", "idempotent", "is_replay"]

#: The request header (lower case, as ASGI gives it).
HEADER = "idempotency-key"
#: The longest key accepted, characters.
MAX_KEY_LENGTH = 255
#: Key in the ASGI scope's ``state`` of the request body the middleware read (bytes).
REQUEST_BODY = "patinox.request_body"
#: The header a replayed response carries.
_REPLAYED = "Idempotent-Replayed"

#: What a create handler answers: its status, its JSON body (a model) and extra headers.
Created = tuple[int, BaseModel, Mapping[str, str]]


def _key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's ``Idempotency-Key``, ``None`` without one.

    Raises:
        InvalidIdempotencyKey: the key is empty or longer than 255 characters.
    """
    for name, value in headers:
        if name == HEADER.encode():
            key = value.decode("latin-1").strip()
            # The draft's value is a structured-field String: a quoted key is the key.
            if len(key) >= 2 and key[0] == key[-1] == '"':
                key = key[1:-1]
            if not key or len(key) > MAX_KEY_LENGTH:
                raise InvalidIdempotencyKey(
                    f"the Idempotency-Key header must be 1-{MAX_KEY_LENGTH} characters",
                    field="Idempotency-Key",
                )
            return key
    return None


def _fingerprint(scope: Scope) -> str:
    """Hex SHA-256 of the request's method, path and body."""
    body: bytes = scope.get("state", {}).get(REQUEST_BODY, b"")
    digest = hashlib.sha256()
    for part in (scope["method"].encode(), scope["path"].encode("utf-8")):
        digest.update(len(part).to_bytes(4, "big") + part)
    digest.update(body)
    return digest.hexdigest()


def is_replay(scope: Scope, store: Callable[[], TenantStore]) -> bool:
    """True when this request is a retry the tenant's records will answer (a POST whose
    ``Idempotency-Key`` and fingerprint match a finished request): the middleware then
    counts it against no rate limit. One read of the tenant's records (``store()``), and
    none for a request without the header.

    Raises:
        InvalidIdempotencyKey: the key is empty or longer than 255 characters.
    """
    if scope["method"] != "POST":
        return False
    key = _key(scope.get("headers", []))
    if key is None:
        return False
    return store().idempotency().peek(key, _fingerprint(scope))


async def idempotent(
    scope: Scope, store: Callable[[], TenantStore], create: Callable[[], Awaitable[Created]]
) -> Response:
    """Answer a create request once per ``Idempotency-Key`` (see the module docstring):
    ``create()`` runs only for a request that takes its key (or has none).

    Args:
        scope: the request's ASGI scope (its headers, method, path, and the body the
            middleware read).
        store: gives the tenant's store, holding its keys (called only for a request
            with the header: a run without one pays for nothing here).
        create: makes the resource; returns ``(status, body, headers)``.

    Raises:
        InvalidIdempotencyKey: the key is empty or longer than 255 characters (400).
        IdempotencyKeyReused: the key was first sent with another request (422).
        IdempotencyInProgress: the key's first request has not finished (409).
        PatinoxError: what ``create`` raised.
    """
    key = _key(scope.get("headers", []))
    if key is None:
        return _response(*await create())
    fingerprint = _fingerprint(scope)
    records = store().idempotency()
    begun = records.begin(key, fingerprint)
    if begun.outcome == "mismatch":
        raise IdempotencyKeyReused(
            "this Idempotency-Key was first sent with another request; use a new key for a new request",
            field="Idempotency-Key",
        )
    if begun.outcome == "in_progress":
        raise IdempotencyInProgress(
            "the first request with this Idempotency-Key has not finished; retry later", retry_after_s=1
        )
    if begun.outcome == "replay":
        kept = json.loads(begun.response or "{}")
        replayed = {**kept.get("headers", {}), _REPLAYED: "true"}
        return JSONResponse(kept.get("body"), status_code=begun.status or 200, headers=replayed)
    try:
        status, body, headers = await create()
    except RunFailed as err:
        if err.fields.get("run_id") is None:
            records.abandon(key, fingerprint)
        else:  # the run exists: its failure is the answer to every retry
            records.finish(key, fingerprint, err.http_status, _kept({"error": err.to_dict()}, {}))
        raise
    except BaseException:
        records.abandon(key, fingerprint)
        raise
    records.finish(key, fingerprint, status, _kept(body.model_dump(mode="json"), headers))
    return _response(status, body, headers)


def _kept(body: Any, headers: Mapping[str, str]) -> str:
    return json.dumps({"body": body, "headers": dict(headers)}, separators=(",", ":"))


def _response(status: int, body: BaseModel, headers: Mapping[str, str]) -> Response:
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=dict(headers))
