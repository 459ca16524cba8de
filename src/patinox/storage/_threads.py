"""One tenant's conversation threads and their messages: :class:`ThreadRecords`.

A thread holds the messages of the runs made on it, oldest first: each successful run
appends the user's input and the agent's reply, and the next run on the thread passes
them to the model as message history. A thread's metadata (a small string map) and each
message's content are sealed under the tenant's DEK like run payloads (AAD
``threads.metadata`` and ``thread_messages.content``, bound to the row's id); ids, roles,
positions and times are not.

A thread keeps at most a number of messages (the plan's ``max_thread_messages``, given to
:meth:`ThreadRecords.append`): appending beyond it drops the oldest, in the same
transaction. Deleting a thread deletes its messages in one transaction.

Made by :meth:`TenantStore.threads <patinox.storage.TenantStore.threads>`, bound to the
store's tenant and placement: every statement carries its ``tenant_id``, and a foreign
thread id answers exactly like a missing one (:class:`~patinox.errors.NotFound`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Literal, TypedDict

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, text, update

from patinox.errors import AlreadyExists, InvalidRequest, NotFound, QuotaExceeded
from patinox.storage import _schema as s
from patinox.storage._schema import utcnow
from patinox.storage._sealer import Sealer
from patinox.tenancy import new_id

__all__ = ["MessageRecord", "Role", "ThreadRecord", "ThreadRecords", "Turn"]

#: The AAD names of the sealed columns (see :data:`~patinox.storage._sealer.SEALED_COLUMNS`).
_META_AAD = "threads.metadata"
_CONTENT_AAD = "thread_messages.content"
_T = s.threads
_M = s.thread_messages
#: Concurrent creators of one tenant's threads take turns on PostgreSQL (an exact count).
_LOCK_TENANT_THREADS = text("SELECT pg_advisory_xact_lock(hashtext('patinox.threads:' || :t))")

#: Who wrote a message: the user's input of a run, or the agent's reply.
Role = Literal["user", "assistant"]


class ThreadRecord(TypedDict):
    """A thread as read (metadata opened).

    Keys: ``id``; ``metadata`` (str -> str); ``messages`` (messages it holds now);
    ``created_at``, ``updated_at`` (UTC; ``updated_at`` moves when messages are added).
    """

    id: str
    metadata: dict[str, str]
    messages: int
    created_at: datetime
    updated_at: datetime


class MessageRecord(TypedDict):
    """A message as read (content opened).

    Keys: ``id``, ``thread_id``, ``position`` (1, 2, ... within the thread, kept when older
    messages are dropped), ``role`` (``user`` | ``assistant``), ``content``, ``run_id``
    (the run that added it), ``created_at`` (UTC).
    """

    id: str
    thread_id: str
    position: int
    role: str
    content: str
    run_id: str | None
    created_at: datetime


class Turn(TypedDict):
    """A message to append: ``role`` and ``content`` (plaintext)."""

    role: Role
    content: str


class ThreadRecords:
    """One tenant's threads and messages (see the module docstring)."""

    __slots__ = ("_sealer", "_tx", "tenant_id")

    def __init__(self, tx: Callable[[], AbstractContextManager[Connection]], sealer: Sealer) -> None:
        self._tx = tx
        self._sealer = sealer
        self.tenant_id = sealer.tenant_id

    # -- threads --------------------------------------------------------------------------

    def create(self, metadata: Mapping[str, str], *, limit: int | None = None) -> ThreadRecord:
        """A new, empty thread with ``metadata`` (sealed here; the caller validates its size).

        Args:
            limit: the most threads the tenant may hold (the plan's ``max_threads``);
                ``None``: no limit.

        Raises:
            QuotaExceeded: the tenant already holds ``limit`` threads (fields ``quota``
                ``max_threads``, ``limit``, ``used``, ``requested``); nothing is written.
            TenantKeysDestroyed: the tenant was crypto-shredded.
            StorageError: the database failed.
        """
        now = utcnow()
        thread_id = new_id("th")
        meta = dict(metadata)
        sealed = self._sealer.seal(_META_AAD, thread_id, json.dumps(meta, sort_keys=True))
        with self._tx() as conn:
            if limit is not None and conn.dialect.name == "postgresql":
                conn.execute(_LOCK_TENANT_THREADS, {"t": self.tenant_id})
            # Insert first (on SQLite this takes the write lock), then count; over the
            # limit, the exception rolls the insert back.
            conn.execute(
                insert(_T).values(
                    tenant_id=self.tenant_id, id=thread_id, metadata=sealed, created_at=now, updated_at=now
                )
            )
            if limit is not None:
                held = int(
                    conn.execute(select(func.count()).where(_T.c.tenant_id == self.tenant_id)).scalar_one()
                )
                if held > limit:
                    raise QuotaExceeded(
                        f"this tenant already holds its limit of {limit} threads; delete one to make room",
                        tenant_id=self.tenant_id,
                        quota="max_threads",
                        limit=limit,
                        used=held - 1,
                        requested=1,
                    )
        return {"id": thread_id, "metadata": meta, "messages": 0, "created_at": now, "updated_at": now}

    def get(self, thread_id: str) -> ThreadRecord:
        """The thread, with how many messages it holds.

        Raises:
            NotFound: no such thread of this tenant (another tenant's alike).
        """
        with self._tx() as conn:
            row = conn.execute(select(_T).where(*self._thread(thread_id))).mappings().first()
            if row is None:
                raise NotFound(f"thread {thread_id!r} not found")
            count = conn.execute(select(func.count()).where(*self._messages_of(thread_id))).scalar_one()
        return self._open(dict(row), int(count))

    def list_threads(self, *, limit: int = 50, before: str | None = None) -> list[ThreadRecord]:
        """This tenant's threads, newest first, at most ``limit``.

        Args:
            before: only threads older than this one (a cursor: the last id of a page).

        Raises:
            NotFound: ``before`` is not a thread of this tenant.
        """
        conds: list[Any] = [_T.c.tenant_id == self.tenant_id]
        with self._tx() as conn:
            if before is not None:
                at = conn.execute(select(_T.c.created_at).where(*self._thread(before))).scalar()
                if at is None:
                    raise NotFound(f"thread {before!r} not found")
                conds.append(or_(_T.c.created_at < at, and_(_T.c.created_at == at, _T.c.id < before)))
            q = select(_T).where(*conds).order_by(_T.c.created_at.desc(), _T.c.id.desc()).limit(limit)
            rows = [dict(r) for r in conn.execute(q).mappings()]
            counts: dict[str, int] = {}
            if rows:
                per_thread = (
                    select(_M.c.thread_id, func.count())
                    .where(_M.c.tenant_id == self.tenant_id, _M.c.thread_id.in_([r["id"] for r in rows]))
                    .group_by(_M.c.thread_id)
                )
                counts = {str(t): int(n) for t, n in conn.execute(per_thread)}
        return [self._open(row, counts.get(row["id"], 0)) for row in rows]

    def delete(self, thread_id: str) -> int:
        """Delete the thread and its messages, in one transaction. Returns how many
        messages were deleted.

        Raises:
            NotFound: no such thread of this tenant (another tenant's alike); nothing deleted.
        """
        with self._tx() as conn:
            gone = conn.execute(delete(_M).where(*self._messages_of(thread_id))).rowcount
            if conn.execute(delete(_T).where(*self._thread(thread_id))).rowcount != 1:
                raise NotFound(f"thread {thread_id!r} not found")  # rolls the messages back
        return int(gone)

    # -- messages -------------------------------------------------------------------------

    def messages(self, thread_id: str, *, limit: int = 100, after: str | None = None) -> list[MessageRecord]:
        """The thread's messages, oldest first, at most ``limit``.

        Args:
            after: only messages after this one (a cursor: the last id of a page).

        Raises:
            NotFound: no such thread of this tenant, or ``after`` is not a message of it.
        """
        conds = self._messages_of(thread_id)
        with self._tx() as conn:
            if conn.execute(select(_T.c.id).where(*self._thread(thread_id))).first() is None:
                raise NotFound(f"thread {thread_id!r} not found")
            if after is not None:
                mark = conn.execute(select(_M.c.position).where(*conds, _M.c.id == after)).scalar()
                if mark is None:
                    raise NotFound(f"message {after!r} not found in thread {thread_id!r}")
                conds.append(_M.c.position > mark)
            q = select(_M).where(*conds).order_by(_M.c.position).limit(limit)
            rows = [dict(r) for r in conn.execute(q).mappings()]
        return [self._open_message(row) for row in rows]

    def history(self, thread_id: str) -> list[MessageRecord]:
        """Every message the thread holds, oldest first (at most the cap it was appended
        with, see :meth:`append`): what a run on it passes to the model.

        Raises:
            NotFound: no such thread of this tenant (another tenant's alike).
        """
        with self._tx() as conn:
            if conn.execute(select(_T.c.id).where(*self._thread(thread_id))).first() is None:
                raise NotFound(f"thread {thread_id!r} not found")
            q = select(_M).where(*self._messages_of(thread_id)).order_by(_M.c.position)
            rows = [dict(r) for r in conn.execute(q).mappings()]
        return [self._open_message(row) for row in rows]

    def append(
        self, thread_id: str, turns: Sequence[Turn], *, keep: int, run_id: str | None = None
    ) -> list[MessageRecord]:
        """Append ``turns`` to the thread in one transaction, then drop its oldest messages
        beyond ``keep``.

        Args:
            turns: the messages, in order (content sealed here).
            keep: the most messages the thread keeps (the plan's ``max_thread_messages``).
            run_id: the run that produced them.

        Returns:
            The messages appended, as stored (opened).

        Raises:
            InvalidRequest: ``keep`` is below 1.
            NotFound: the thread is gone (deleted meanwhile, or another tenant's); nothing
                is written.
            TenantKeysDestroyed: the tenant was crypto-shredded.
            StorageError: the database failed.
        """
        if keep < 1:
            raise InvalidRequest("a thread keeps at least one message", field="max_thread_messages")
        last_error: AlreadyExists | None = None
        for _ in range(3):  # two appends to one thread at once: the later one numbers again
            try:
                return self._append(thread_id, turns, keep=keep, run_id=run_id)
            except AlreadyExists as err:
                last_error = err
        assert last_error is not None
        raise last_error

    def _append(
        self, thread_id: str, turns: Sequence[Turn], *, keep: int, run_id: str | None
    ) -> list[MessageRecord]:
        now = utcnow()
        ids = [new_id("msg") for _ in turns]
        sealed = [self._sealer.seal(_CONTENT_AAD, i, t["content"]) for i, t in zip(ids, turns, strict=True)]
        mine = self._messages_of(thread_id)
        with self._tx() as conn:
            # Touch the thread first: it must exist, and on SQLite this takes the write lock.
            touched = conn.execute(update(_T).where(*self._thread(thread_id)).values(updated_at=now)).rowcount
            if touched != 1:
                raise NotFound(f"thread {thread_id!r} not found")
            last = int(conn.execute(select(func.max(_M.c.position)).where(*mine)).scalar() or 0)
            out: list[MessageRecord] = []
            for n, (msg_id, turn, blob) in enumerate(zip(ids, turns, sealed, strict=True), start=last + 1):
                conn.execute(
                    insert(_M).values(
                        tenant_id=self.tenant_id,
                        id=msg_id,
                        thread_id=thread_id,
                        position=n,
                        role=turn["role"],
                        content=blob,
                        run_id=run_id,
                        created_at=now,
                    )
                )
                out.append(
                    {
                        "id": msg_id,
                        "thread_id": thread_id,
                        "position": n,
                        "role": turn["role"],
                        "content": turn["content"],
                        "run_id": run_id,
                        "created_at": now,
                    }
                )
            newest = last + len(turns)
            conn.execute(delete(_M).where(*mine, _M.c.position <= newest - keep))
        return out[-keep:]

    # -- helpers --------------------------------------------------------------------------

    def _thread(self, thread_id: str) -> list[Any]:
        return [_T.c.tenant_id == self.tenant_id, _T.c.id == thread_id]

    def _messages_of(self, thread_id: str) -> list[Any]:
        return [_M.c.tenant_id == self.tenant_id, _M.c.thread_id == thread_id]

    def _open(self, row: dict[str, Any], count: int) -> ThreadRecord:
        meta = json.loads(self._sealer.open(_META_AAD, row["id"], row["metadata"]) or "{}")
        return {
            "id": row["id"],
            "metadata": meta,
            "messages": count,
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
        }

    def _open_message(self, row: dict[str, Any]) -> MessageRecord:
        return {
            "id": row["id"],
            "thread_id": row["thread_id"],
            "position": int(row["position"]),
            "role": row["role"],
            "content": self._sealer.open(_CONTENT_AAD, row["id"], row["content"]) or "",
            "run_id": row["run_id"],
            "created_at": row["created_at"],
        }
