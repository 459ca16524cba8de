"""One tenant's ``Idempotency-Key`` records: :class:`IdempotencyRecords`.

A POST that creates something may carry an ``Idempotency-Key`` header
(draft-ietf-httpapi-idempotency-key-header). Its first request takes the key
(:meth:`IdempotencyRecords.begin`: one insert, unique per tenant, so of N concurrent
requests with one key exactly one takes it), and when it is answered its response is kept
(:meth:`IdempotencyRecords.finish`), sealed under the tenant's DEK like run payloads. A
retry with the key and the same request is answered that response; with another request,
or while the first is still in progress, it is refused (the caller maps that to 422 and
409). A key expires :data:`KEY_TTL` after it was taken: it is then free for another
request, and expired keys of the tenant are deleted whenever it takes a new one. A key
still in progress :data:`IN_PROGRESS_LEASE` after it was taken (its first request's process
died before answering) is taken over by a retry of the same request.

Made by :meth:`TenantStore.idempotency <patinox.storage.TenantStore.idempotency>`, bound
to the store's tenant and placement: every statement carries its ``tenant_id``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import ColumnElement, Connection, and_, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from patinox.storage import _schema as s
from patinox.storage._schema import utcnow
from patinox.storage._sealer import Sealer

__all__ = ["IN_PROGRESS_LEASE", "KEY_TTL", "Begun", "IdempotencyRecords"]

#: How long a key holds its request and response: 24 hours.
KEY_TTL = timedelta(hours=24)
#: How long a key may stay in progress before a retry of the same request takes it over:
#: its first request's process died (a request ends well before this: the longest run
#: timeout of any plan is 15 minutes).
IN_PROGRESS_LEASE = timedelta(minutes=20)
#: The AAD name of a kept response (see :data:`~patinox.storage._sealer.SEALED_COLUMNS`).
_AAD = "idempotency_keys.response"
_T = s.idempotency_keys


@dataclass(frozen=True, slots=True)
class Begun:
    """What :meth:`IdempotencyRecords.begin` found.

    Attributes:
        outcome: ``new`` (this request took the key: run it, then :meth:`~IdempotencyRecords.finish`
            or :meth:`~IdempotencyRecords.abandon`), ``replay`` (the same request finished:
            answer ``response``), ``in_progress`` (the same key's first request has not
            finished), ``mismatch`` (the key was used for another request).
        status: the kept response's HTTP status (``replay`` only).
        response: the kept response, as :meth:`~IdempotencyRecords.finish` was given it
            (``replay`` only).
    """

    outcome: Literal["new", "replay", "in_progress", "mismatch"]
    status: int | None = None
    response: str | None = None


class IdempotencyRecords:
    """One tenant's ``Idempotency-Key`` records (see the module docstring)."""

    __slots__ = ("_postgres", "_sealer", "_tx", "tenant_id")

    def __init__(
        self,
        tx: Callable[[], AbstractContextManager[Connection]],
        sealer: Sealer,
        *,
        postgres: bool,
    ) -> None:
        self._tx = tx
        self._sealer = sealer
        self._postgres = postgres
        self.tenant_id = sealer.tenant_id

    def begin(self, key: str, fingerprint: str, *, now: datetime | None = None) -> Begun:
        """Take ``key`` for the request ``fingerprint`` (hex SHA-256 of its method, route
        and body), or say what holds it. Expired keys of the tenant are deleted first; the
        same request's key still in progress after :data:`IN_PROGRESS_LEASE` is taken over.

        Args:
            key: the header's value, 1-255 characters (the caller checks).
            now: the present (UTC; for tests).

        Raises:
            StorageError: the database failed.
        """
        now = now or utcnow()
        row = {
            "tenant_id": self.tenant_id,
            "key": key,
            "fingerprint": fingerprint,
            "state": "in_progress",
            "created_at": now,
            "expires_at": now + KEY_TTL,
        }
        insert = (pg_insert(_T) if self._postgres else sqlite_insert(_T)).on_conflict_do_nothing()
        mine = _T.c.tenant_id == self.tenant_id
        with self._tx() as conn:
            conn.execute(delete(_T).where(mine, _T.c.expires_at <= now))
            # RETURNING, not rowcount: psycopg reports no count for a conflict-skipping insert.
            if conn.execute(insert.values(row).returning(_T.c.key)).first() is not None:
                return Begun("new")
            taken_over = conn.execute(
                update(_T)
                .where(self._held(key, fingerprint), _T.c.created_at <= now - IN_PROGRESS_LEASE)
                .values(created_at=now, expires_at=now + KEY_TTL)
                .returning(_T.c.key)
            ).first()
            if taken_over is not None:
                return Begun("new")
            held = conn.execute(
                select(_T.c.fingerprint, _T.c.state, _T.c.response_status, _T.c.response).where(
                    mine, _T.c.key == key
                )
            ).first()
        if held is None:
            # Its first request failed and gave the key back between our insert and read.
            return Begun("in_progress")
        if held.fingerprint != fingerprint:
            return Begun("mismatch")
        if held.state != "done":
            return Begun("in_progress")
        return Begun("replay", int(held.response_status), self._sealer.open(_AAD, key, held.response))

    def peek(self, key: str, fingerprint: str, *, now: datetime | None = None) -> bool:
        """Whether ``key`` holds the finished request ``fingerprint`` (unexpired): a retry
        :meth:`begin` will answer with its kept response. One read by primary key.

        Raises:
            StorageError: the database failed.
        """
        q = select(_T.c.key).where(
            _T.c.tenant_id == self.tenant_id,
            _T.c.key == key,
            _T.c.fingerprint == fingerprint,
            _T.c.state == "done",
            _T.c.expires_at > (now or utcnow()),
        )
        with self._tx() as conn:
            return conn.execute(q).first() is not None

    def finish(self, key: str, fingerprint: str, status: int, response: str) -> bool:
        """Keep the response (``status``, and ``response``: text, sealed here) of the request
        that took ``key``. Returns whether the key was still that request's.

        Raises:
            TenantKeysDestroyed: the tenant was crypto-shredded.
            StorageError: the database failed.
        """
        sealed = self._sealer.seal(_AAD, key, response)
        with self._tx() as conn:
            done = conn.execute(
                update(_T)
                .where(self._held(key, fingerprint))
                .values(state="done", response_status=status, response=sealed)
            ).rowcount
        return bool(done)

    def abandon(self, key: str, fingerprint: str) -> None:
        """Give ``key`` back: its request created nothing (it was refused or failed before
        creating anything), so a retry with the key runs anew.

        Raises:
            StorageError: the database failed.
        """
        with self._tx() as conn:
            conn.execute(delete(_T).where(self._held(key, fingerprint)))

    def purge_expired(self, *, now: datetime | None = None) -> int:
        """Delete the tenant's expired keys; returns how many.

        Raises:
            StorageError: the database failed.
        """
        with self._tx() as conn:
            gone = conn.execute(
                delete(_T).where(_T.c.tenant_id == self.tenant_id, _T.c.expires_at <= (now or utcnow()))
            ).rowcount
        return int(gone)

    def _held(self, key: str, fingerprint: str) -> ColumnElement[bool]:
        return and_(
            _T.c.tenant_id == self.tenant_id,
            _T.c.key == key,
            _T.c.fingerprint == fingerprint,
            _T.c.state == "in_progress",
        )
