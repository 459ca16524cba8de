"""SQLAlchemy-internal speed-ups of the run path, in one place, behind one switch.

Three speed-ups lean on SQLAlchemy beyond its public API (private attributes, the exact
text its SQLite ``DATETIME`` stores). They live here and nowhere else, which is why
``sqlalchemy`` is capped below its next minor release in ``pyproject.toml``, and a test
(``tests/storage/test_fastpath_switch.py``) runs the run path with them on and off and
compares the stored rows.

**The switch.** ``PATINOX_SQLA_FASTPATH=0`` (or ``false``, ``no``, ``off``) in the
environment turns all three off, for a process, read once when this module is first
imported: writes take :meth:`Connection.execute`, every transaction ``engine.begin()``,
UTC datetimes SQLAlchemy's own two-step binding. Stored rows are the same either way;
only the Python spent per statement differs. Unset (or any other value), they are on.

**Fast writes** (:func:`execute_write`). A synchronous run makes nine writes in two
transactions. Executing a prebuilt Core statement through :meth:`Connection.execute`
costs about 25 us of Python per statement on this machine (execution context, parameter
processing, result set-up), against about 3 us for the same SQL on the ``sqlite3``
cursor. :func:`fast_write` keeps what matters of SQLAlchemy and drops the rest:

* the SQL is the statement SQLAlchemy compiles for the connection's dialect, once per
  statement and set of parameter names (so the tenant predicate the data layer built is
  exactly the one executed);
* every parameter goes through its column type's own bind processor (datetimes, JSON,
  binary), as SQLAlchemy would apply it (``TypeEngine._cached_bind_processor``);
* it runs on the connection's own DBAPI connection, inside the caller's transaction;
* while the connection, its engine or its dialect has any event listener (SQLAlchemy's
  own ``_has_events`` flags, which its execute path checks too), every write takes the
  ordinary path, so observers (statement counters, tracing, ``handle_error``) still see
  every one with its execution context;
* driver errors are wrapped as SQLAlchemy wraps them (``IntegrityError`` ...), so
  :func:`~patinox.storage.engine.translate_errors` maps them as before.

Statements this cannot reproduce exactly fall back to :meth:`Connection.execute`:
anything with Python-side column defaults to compute, ``RETURNING``, or a dialect other
than SQLite (on PostgreSQL the network round trip dominates a statement's cost).

**Kept connection** (:func:`begin`, :func:`keep_for`, :func:`dispose`). Every control-plane
and tenant transaction used to be ``engine.begin()``: a new :class:`~sqlalchemy.Connection`,
a pool checkout (with its events), the commit, the pool's reset-on-return (a rollback) and
the checkin. On this machine that is about 20 us of Python around an empty transaction,
against about 3 us for ``Connection.begin()`` on a connection already held; a synchronous
run has two transactions, and their connection handling was a measurable part of a run's
cost beside SQLite's own work.

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

**UTC datetimes on SQLite** (:func:`sqlite_datetime_binder`). With SQLite's default
storage format, a UTC datetime is bound in one step: the text SQLAlchemy's ``DATETIME``
stores (``YYYY-MM-DD HH:MM:SS.ffffff``), made by ``datetime.isoformat`` instead of the
type's ``process_bind_param`` then a ``%``-format (0.9 us of 2.2 us per value on this
machine; a run binds seven). Recognising the default format reads SQLAlchemy's private
``_storage_format``.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, suppress
from datetime import UTC, datetime
from typing import Any, Final, Literal

from sqlalchemy import Connection, Engine, exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase

__all__ = [
    "ENABLED",
    "begin",
    "dispose",
    "execute_write",
    "fast_write",
    "keep_for",
    "plain_write",
    "sqlite_datetime_binder",
]

#: Whether the speed-ups are on in this process (see "The switch" above).
ENABLED: Final = os.environ.get("PATINOX_SQLA_FASTPATH", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)

# -- fast writes -------------------------------------------------------------------------

_Plan = tuple[str, tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]] | None
_FROM_PARAMS: Final = object()

#: (statement id, parameter names, dialect id) -> (statement, dialect, plan); a plan is
#: (sql, ((name, constant, processor), ...)), or None when the statement must take the
#: ordinary path. Keyed by the dialect object, not its name: bind processors come from
#: the engine's own dialect (its JSON serialiser, datetime storage), and each engine has
#: its own (the main database and every open silo file). The entry holds the statement
#: and the dialect, so neither id can be reused while it lives. Statements are
#: module-level constants: about a dozen per engine.
_PLANS: dict[tuple[int, tuple[str, ...], int], tuple[UpdateBase, Any, _Plan]] = {}
_MAX_PLANS: Final = 4096


def _plan(conn: Connection, stmt: UpdateBase, names: tuple[str, ...]) -> _Plan:
    dialect = conn.dialect
    if dialect.name != "sqlite" or dialect.paramstyle != "qmark":
        return None
    compiled = stmt.compile(dialect=dialect, column_keys=list(names))
    if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
        return None
    if compiled.insert_prefetch or compiled.update_prefetch or compiled.effective_returning:
        return None  # Python-side defaults to compute, or rows to return
    given = set(names)
    binds = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        if bind.expanding or bind.literal_execute or bind.callable is not None:
            return None
        if name not in given and bind.required:
            # No value given: Connection.execute refuses to run it ("a value is required
            # for bind parameter"); binding the placeholder's None would run it with NULL.
            return None
        processor = bind.type._cached_bind_processor(dialect)  # the processor execute() applies
        binds.append((name, _FROM_PARAMS if name in given else bind.value, processor))
    return compiled.string, tuple(binds)


def fast_write(conn: Connection, stmt: UpdateBase, params: Mapping[str, Any]) -> int:
    """Execute the INSERT, UPDATE or DELETE ``stmt`` with ``params`` in ``conn``'s
    transaction; returns the number of rows it changed.

    Raises:
        sqlalchemy.exc.DBAPIError: the driver refused it (wrapped as SQLAlchemy does).
    """
    names = tuple(params)
    dialect = conn.dialect
    key = (id(stmt), names, id(dialect))
    entry = _PLANS.get(key)
    if entry is None or entry[0] is not stmt or entry[1] is not dialect:
        entry = (stmt, dialect, _plan(conn, stmt, names))
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = entry
    plan = entry[2]
    if (
        plan is None
        # Outside a transaction Connection.execute autobegins one (which conn.commit()
        # then commits); a write on the raw cursor would open only the driver's, which
        # commit() does not know of and the pool's reset rolls back.
        or not conn.in_transaction()
        # Listeners are owed an ExecutionContext (tracers keep their span on it), may
        # rewrite the statement (retval=True) and see errors (handle_error): only
        # Connection.execute gives them that. SQLAlchemy sets these flags when any
        # connection or dialect event listener is added (as its own execute path checks).
        or conn._has_events
        or conn.engine._has_events
        or dialect._has_events
        # The SQL of a plan names the tables without the connection's schema translation
        # (a tenant in its own schema); Connection.execute applies it.
        or conn.get_execution_options().get("schema_translate_map")
    ):
        return int(conn.execute(stmt, dict(params)).rowcount)
    sql, binds = plan
    try:
        values = [
            (params[name] if constant is _FROM_PARAMS else constant)
            if processor is None
            else processor(params[name] if constant is _FROM_PARAMS else constant)
            for name, constant, processor in binds
        ]
    except Exception as err:
        # As Connection.execute reports a value its column type refuses (a naive datetime
        # for a UTC column, JSON it cannot serialise): a StatementError chaining it, which
        # translate_errors() maps; raw, it escaped as an unhandled ValueError/TypeError.
        raise _wrapped(conn, sql, [dict(params)], err) from err
    dbapi_conn = conn.connection.dbapi_connection
    if dbapi_conn is None:
        return int(conn.execute(stmt, dict(params)).rowcount)
    try:
        # sqlite3's Connection.execute: a cursor, the statement run to completion (a
        # write returns no rows), the cursor released with its last reference.
        return int(dbapi_conn.execute(sql, values).rowcount)
    except dialect.loaded_dbapi.Error as err:
        raise _wrapped(conn, sql, values, err) from err


def _wrapped(conn: Connection, sql: str, params: Any, err: Exception) -> exc.StatementError:
    """``err`` wrapped as :meth:`Connection.execute` wraps it: a driver error as its
    ``DBAPIError`` subclass (``IntegrityError`` ...), anything else (a bind processor
    refusing a value) as a ``StatementError``."""
    return exc.DBAPIError.instance(
        sql,
        params,
        err,
        conn.dialect.loaded_dbapi.Error,
        hide_parameters=conn.engine.hide_parameters,
        dialect=conn.dialect,
    )


def plain_write(conn: Connection, stmt: UpdateBase, params: Mapping[str, Any]) -> int:
    """:func:`fast_write` without the speed-up: ``stmt`` through :meth:`Connection.execute`.

    Raises:
        sqlalchemy.exc.DBAPIError: the driver refused it.
    """
    return int(conn.execute(stmt, dict(params)).rowcount)


#: Execute an INSERT, UPDATE or DELETE in the caller's transaction and return the number of
#: rows it changed: :func:`fast_write`, or :func:`plain_write` with the speed-ups off.
execute_write: Final = fast_write if ENABLED else plain_write


# -- kept connection ---------------------------------------------------------------------

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
    """Let ``engine``'s owner thread keep a connection between transactions (see
    "Kept connection" in the module docstring); nothing when the speed-ups are off."""
    if ENABLED:
        setattr(engine, _ATTR, _Kept(engine))


def dispose(engine: Engine) -> None:
    """Close ``engine``'s kept connection, if any, then ``engine.dispose()``."""
    kept: _Kept | None = engine.__dict__.get(_ATTR)
    if kept is not None:
        kept.close()
    engine.dispose()


class begin:
    """``engine.begin()``: a transaction, committed at the end or rolled back on error,
    on the kept connection when the calling thread owns it (see "Kept connection" in the
    module docstring); a context
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


# -- UTC datetimes on SQLite -------------------------------------------------------------

#: SQLAlchemy's default text format of a SQLite ``DATETIME``.
_SQLITE_DATETIME_FORMAT = sqlite.DATETIME._storage_format


def sqlite_datetime_binder(impl: Any) -> Callable[[datetime | None], str | None] | None:
    """The one-step binder of a UTC datetime for a SQLite ``DATETIME`` type ``impl`` (the
    dialect's implementation), or ``None`` when the caller must bind as usual: the
    speed-ups are off, or ``impl`` stores another format than SQLAlchemy's default."""
    if ENABLED and getattr(impl, "_storage_format", None) == _SQLITE_DATETIME_FORMAT:
        return _sqlite_utc_text
    return None


def _sqlite_utc_text(value: datetime | None) -> str | None:
    """``value`` as SQLite ``DATETIME`` text in UTC: what
    :meth:`~patinox.storage._schema.UTCDateTime.process_bind_param` and SQLAlchemy's
    default ``DATETIME`` format make of it, in one step.

    Raises:
        ValueError: ``value`` is naive (no timezone).
    """
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
