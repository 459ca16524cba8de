"""Prebuilt writes on the driver connection: the run path's INSERT, UPDATE and DELETE
statements without SQLAlchemy's per-execution machinery, on SQLite.

A synchronous run makes nine writes in two transactions. Executing a prebuilt Core
statement through :meth:`Connection.execute` costs about 25 us of Python per statement
on this machine (execution context, parameter processing, result set-up), against about
3 us for the same SQL on the ``sqlite3`` cursor. :func:`write` keeps what matters of
SQLAlchemy and drops the rest:

* the SQL is the statement SQLAlchemy compiles for the connection's dialect, once per
  statement and set of parameter names (so the tenant predicate the data layer built is
  exactly the one executed);
* every parameter goes through its column type's own bind processor (datetimes, JSON,
  binary), as SQLAlchemy would apply it;
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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from sqlalchemy import Connection, exc
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase

__all__ = ["write"]

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
        processor = bind.type._cached_bind_processor(dialect)
        binds.append((name, _FROM_PARAMS if name in given else bind.value, processor))
    return compiled.string, tuple(binds)


def write(conn: Connection, stmt: UpdateBase, params: Mapping[str, Any]) -> int:
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
