"""One connection an SQLite engine's owning thread keeps open between its transactions.

Every control-plane and tenant transaction used to be ``engine.begin()``: a new
:class:`~sqlalchemy.Connection`, a pool checkout (with its events), the commit, the
pool's reset-on-return (a rollback) and the checkin. On this machine that is about 20 us
of Python around an empty transaction, against about 3 us for ``Connection.begin()`` on
a connection already held; a synchronous run has two transactions, and their
connection handling was a measurable part of a run's cost beside SQLite's own work.

:func:`begin` gives the same transaction on a connection kept for the engine's *owner
thread*, the first thread that begins a transaction on it (the server's or worker's
event-loop thread: the main thread of ``patinox serve`` and ``patinox worker``). Any
other thread, and a transaction begun while the kept connection is already in one (a
nested transaction on the same thread), takes the ordinary ``engine.begin()`` path, so
behaviour is unchanged there. Nothing else changes either: the same engine, pool,
dialect, pragmas and event listeners; between transactions the kept connection has no
transaction open, so it holds no SQLite lock or snapshot (checkpoints and other
processes' writers never wait for it).

A kept connection that was invalidated (the driver reported it broken) or is left in a
transaction is closed and dropped, and the next transaction checks out a fresh one.
:func:`dispose` closes it (a transaction in flight on it finishes first) and disposes of
the engine, which keeps none from then on; after a plain ``Engine.dispose()``
(a new pool) the next transaction closes it and checks out a fresh one. (Not an
``engine_disposed`` listener: any connection-event listener makes SQLAlchemy dispatch
events around every statement of the engine.) Only SQLite file engines keep
one (:func:`patinox.storage.engine.make_engine`): on PostgreSQL the pool's pre-ping on
checkout is what detects a server restart, and a statement costs a network round trip.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import AbstractContextManager, suppress
from typing import Any, Literal

from sqlalchemy import Connection, Engine

__all__ = ["begin", "dispose", "keep_for"]

#: The attribute of an engine that holds its :class:`_Kept`.
_ATTR = "_patinox_kept"


class _Kept:
    """The kept connection of one engine, its owner thread and whether it is in use."""

    __slots__ = ("busy", "closed", "conn", "engine", "lock", "owner", "pool")

    def __init__(self, engine: Engine) -> None:
        # Weak: the engine holds this object (a kept connection refers to the engine too,
        # until dispose() closes it).
        self.engine = weakref.ref(engine)
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.conn: Connection | None = None
        self.pool: object = None  # the pool ``conn`` came from
        self.busy = False
        #: dispose() was called: the engine keeps no connection again. A kept connection
        #: holds its engine alive (SQLAlchemy references checked-out connections), so one
        #: kept on an engine nobody disposes again (an evicted silo engine a store still
        #: uses) would leak the engine and its open file for the life of the process.
        self.closed = False

    def take(self) -> Connection | None:
        """The kept connection for the calling thread, marked busy; None when the caller
        must take the ordinary path (another thread, or already busy)."""
        me = threading.get_ident()
        stale = None
        with self.lock:
            if self.owner is None:
                self.owner = me
            if me != self.owner or self.busy or self.closed:
                return None
            engine = self.engine()
            if engine is None:
                return None
            conn = self.conn
            if conn is not None and (engine.pool is not self.pool or conn.invalidated or conn.closed):
                # Engine.dispose() made a new pool, or the connection broke meanwhile.
                stale, self.conn = conn, None
            if self.conn is None:
                self.conn, self.pool = engine.connect(), engine.pool
            self.busy = True
            conn = self.conn
        if stale is not None:
            with suppress(Exception):
                stale.close()
        return conn

    def give_back(self, conn: Connection) -> None:
        """Done with ``conn``; closed and dropped if it is broken or left in a transaction."""
        broken = conn.invalidated or conn.closed or conn.in_transaction()
        with self.lock:
            self.busy = False
            if self.conn is not conn:
                broken = True  # dropped by close() while in use: closed now it is done
            elif broken:
                self.conn = None
        if broken:
            with suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Close the kept connection (the engine is being disposed); one in use by a
        transaction (on the owner thread) is closed when that transaction ends, as a plain
        ``Engine.dispose()`` leaves checked-out connections to their users."""
        with self.lock:
            conn, self.conn = self.conn, None
            self.closed = True
            if self.busy:
                conn = None  # give_back() closes it
        if conn is not None:
            with suppress(Exception):
                conn.close()


def keep_for(engine: Engine) -> None:
    """Let ``engine``'s owner thread keep a connection between transactions (see module)."""
    setattr(engine, _ATTR, _Kept(engine))


def dispose(engine: Engine) -> None:
    """Close ``engine``'s kept connection, if any, then ``engine.dispose()``."""
    kept: _Kept | None = engine.__dict__.get(_ATTR)
    if kept is not None:
        kept.close()
    engine.dispose()


class begin:
    """``engine.begin()``: a transaction, committed at the end or rolled back on error,
    on the kept connection when the calling thread owns it (see module); a context
    manager handing back the :class:`~sqlalchemy.Connection`. A class, not a generator:
    every transaction of a run enters one.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: as ``engine.begin()`` raises.
    """

    __slots__ = ("_conn", "_engine", "_kept", "_outer")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._kept: _Kept | None = None
        self._conn: Connection | None = None
        #: The context manager whose exit ends the transaction: the kept connection's
        #: Transaction, or ``engine.begin()``'s when there is no kept connection to use.
        self._outer: AbstractContextManager[Any] | None = None

    def __enter__(self) -> Connection:
        kept: _Kept | None = self._engine.__dict__.get(_ATTR)
        conn = kept.take() if kept is not None else None
        if conn is None:
            fresh = self._engine.begin()
            conn = fresh.__enter__()
            self._outer = fresh
            return conn
        assert kept is not None
        try:
            tx = conn.begin()
            tx.__enter__()
        except BaseException:
            kept.give_back(conn)
            raise
        self._kept, self._conn, self._outer = kept, conn, tx
        return conn

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: Any
    ) -> Literal[False]:
        outer, kept, conn = self._outer, self._kept, self._conn
        assert outer is not None
        try:
            outer.__exit__(kind, err, tb)
        finally:
            if kept is not None and conn is not None:
                kept.give_back(conn)
        return False
