"""Where the driver-cursor write path (patinox.storage._fast) must keep the contract of
:meth:`Connection.execute`, beyond the bytes it stores: errors raised while binding a
value, missing parameters, SQLAlchemy's autobegin, statement listeners, schema
translation, and engines whose dialects differ. Real SQLite files, no mocks."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, bindparam, create_engine, delete, event, exc, insert, update

from patinox.errors import InvalidRequest, StorageError
from patinox.storage import _schema as s
from patinox.storage import execute_write, make_engine, translate_errors

QT = s.queue_tenants
INSERT_QT = insert(QT)
#: Module-level like the run path's statements (the plan cache keys on the statement).
RELEASE = delete(s.run_queue).where(
    s.run_queue.c.tenant_id == bindparam("b_tenant"), s.run_queue.c.run_id == bindparam("b_run")
)
SET_TAG = update(QT).where(QT.c.tenant_id == bindparam("b_t")).values(last_tag=bindparam("b_tag"))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "x.db"


@pytest.fixture
def engine(path: Path) -> Iterator[Engine]:
    e = make_engine(f"sqlite:///{path}")
    s.metadata.create_all(e)
    yield e
    e.dispose()


def _tags(path: Path) -> dict[str, Any]:
    with sqlite3.connect(path) as c:
        return dict(c.execute("SELECT tenant_id, last_tag FROM queue_tenants").fetchall())


Way = Callable[[Connection, Any, dict[str, Any]], Any]
WAYS: dict[str, Way] = {
    "sqlalchemy": lambda conn, stmt, params: conn.execute(stmt, params),
    "fast": execute_write,
}


def _raised(engine: Engine, way: Way, stmt: Any, params: dict[str, Any]) -> BaseException:
    with pytest.raises(Exception) as info, translate_errors(), engine.begin() as conn:
        way(conn, stmt, params)
    return info.value


def _audit_row(detail: object) -> dict[str, object]:
    """An audit_log row with ``detail`` as its JSON column."""
    return {
        "tenant_id": "t",
        "id": "au_1",
        "at": datetime.fromisoformat("2026-01-01T00:00:00+00:00"),
        "actor": "a",
        "action": "b",
        "target": None,
        "outcome": "ok",
        "detail": detail,
    }


@pytest.mark.parametrize(
    ("stmt", "params", "expected"),
    [
        # UTCDateTime refuses a naive datetime: 422 on the ordinary path.
        (
            insert(s.tenant_keys),
            {"tenant_id": "t", "version": 1, "wrapped": b"k", "created_at": datetime(2026, 1, 1)},
            InvalidRequest,
        ),
        # Float's bind processor refuses a non-number.
        (INSERT_QT, {"tenant_id": "t", "last_tag": "not a number"}, InvalidRequest),
        # JSON cannot serialise a Decimal: a storage error, not an unhandled TypeError.
        (
            insert(s.audit_log),
            _audit_row({"amount": Decimal("1.5")}),
            StorageError,
        ),
    ],
    ids=["naive-datetime", "float-from-text", "json-decimal"],
)
def test_a_value_its_column_type_refuses_raises_as_sqlalchemy_does(
    engine: Engine, stmt: Any, params: dict[str, Any], expected: type[Exception]
) -> None:
    """A bind processor's ValueError/TypeError escaped the fast path raw, so
    translate_errors() let it through (a 500) instead of mapping it."""
    ordinary = _raised(engine, WAYS["sqlalchemy"], stmt, params)
    fast = _raised(engine, WAYS["fast"], stmt, params)
    assert type(ordinary) is expected
    assert type(fast) is type(ordinary)
    assert isinstance(fast.__cause__, exc.StatementError)


def test_a_missing_parameter_is_refused_not_bound_as_null(engine: Engine, path: Path) -> None:
    """SQLAlchemy refuses to execute without a value for a required bind parameter; the
    fast path bound NULL instead (an UPDATE that sets a column to NULL, a DELETE that
    silently matches nothing)."""
    with engine.begin() as conn:
        conn.execute(INSERT_QT, {"tenant_id": "t", "last_tag": 1.0})
    for stmt, params in ((SET_TAG, {"b_t": "t"}), (RELEASE, {"b_tenant": "t"})):
        with pytest.raises(exc.StatementError), engine.begin() as conn:
            conn.execute(stmt, params)
        with pytest.raises(exc.StatementError, match="value is required"), engine.begin() as conn:
            execute_write(conn, stmt, params)
    assert _tags(path) == {"t": 1.0}


def test_a_write_that_begins_the_transaction_is_committed_by_commit(engine: Engine, path: Path) -> None:
    """A Connection autobegins its transaction on the first execute; a write on the raw
    cursor did not, so ``conn.commit()`` committed nothing and the write was rolled back
    when the connection went back to the pool."""
    for way, key in ((WAYS["sqlalchemy"], "sa"), (WAYS["fast"], "fast")):
        with engine.connect() as conn:
            way(conn, INSERT_QT, {"tenant_id": key, "last_tag": 0.0})
            conn.commit()
    assert _tags(path) == {"sa": 0.0, "fast": 0.0}


def test_listeners_get_an_execution_context(engine: Engine) -> None:
    """Cursor listeners are documented to receive the ExecutionContext; tracers keep state
    on it between before_ and after_cursor_execute (OpenTelemetry's SQLAlchemy
    instrumentation stores its span there). The fast path passed ``None``."""
    spans: list[str] = []

    def before(_c: Any, _cur: Any, statement: str, _p: Any, context: Any, _many: bool) -> None:
        context._test_span = statement

    def after(_c: Any, _cur: Any, _s: str, _p: Any, context: Any, _many: bool) -> None:
        spans.append(context._test_span)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    with engine.begin() as conn:
        execute_write(conn, INSERT_QT, {"tenant_id": "t", "last_tag": 0.0})
    assert len(spans) == 1 and spans[0].startswith("INSERT INTO queue_tenants")


def test_a_listener_may_rewrite_the_statement(engine: Engine) -> None:
    """``before_cursor_execute`` with ``retval=True`` replaces the statement (SQL
    commenters tag queries this way); the fast path dropped what it returned."""
    executed: list[str] = []

    def tag(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> Any:
        return statement + " /* traced */", params

    event.listen(engine, "before_cursor_execute", tag, retval=True)
    event.listen(engine, "after_cursor_execute", lambda _c, _cur, st, *_: executed.append(st))
    with engine.begin() as conn:
        execute_write(conn, INSERT_QT, {"tenant_id": "t", "last_tag": 0.0})
    assert executed == ["INSERT INTO queue_tenants (tenant_id, last_tag) VALUES (?, ?) /* traced */"]


def test_handle_error_listeners_see_a_failed_write(engine: Engine) -> None:
    seen: list[str] = []
    event.listen(engine, "handle_error", lambda ctx: seen.append(type(ctx.original_exception).__name__))
    with engine.begin() as conn:
        conn.execute(INSERT_QT, {"tenant_id": "t", "last_tag": 0.0})
    with pytest.raises(exc.IntegrityError), engine.begin() as conn:
        execute_write(conn, INSERT_QT, {"tenant_id": "t", "last_tag": 0.0})
    assert seen == ["IntegrityError"]


def test_a_schema_translate_map_is_honoured(path: Path, tmp_path: Path) -> None:
    """The tenant store sets ``schema_translate_map`` on its connection for a tenant in its
    own schema; the fast path executed SQL compiled without it, writing the row into the
    default schema's table instead."""
    other = tmp_path / "other.db"
    engine = make_engine(f"sqlite:///{path}")
    attach = f"ATTACH DATABASE '{other}' AS other"
    event.listen(engine, "connect", lambda dbapi_conn, _: dbapi_conn.execute(attach))
    s.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE other.queue_tenants (tenant_id VARCHAR(40) PRIMARY KEY, last_tag FLOAT NOT NULL)"
        )
    with engine.begin() as conn:
        conn.execution_options(schema_translate_map={None: "other"})
        execute_write(conn, INSERT_QT, {"tenant_id": "t", "last_tag": 0.0})
    engine.dispose()
    assert _tags(path) == {}
    assert _tags(other) == {"t": 0.0}


def test_each_engine_binds_with_its_own_dialect(path: Path, tmp_path: Path) -> None:
    """A plan caches the bind processors of the dialect it was compiled for; plans keyed
    only by the dialect's name made a second engine configured differently (here its own
    JSON serialiser) store what the first engine would have."""
    stmt = insert(s.audit_log)
    row = _audit_row({"k": "v"})
    first = make_engine(f"sqlite:///{path}")
    s.metadata.create_all(first)
    with first.begin() as conn:
        execute_write(conn, stmt, row)
    first.dispose()
    second_path = tmp_path / "second.db"
    second = create_engine(
        f"sqlite:///{second_path}", json_serializer=lambda v: json.dumps(v, sort_keys=True, indent=1)
    )
    s.metadata.create_all(second)
    with second.begin() as conn:
        execute_write(conn, stmt, row)
    second.dispose()
    with sqlite3.connect(second_path) as c:
        (detail,) = c.execute("SELECT detail FROM audit_log").fetchone()
    assert detail == json.dumps({"k": "v"}, sort_keys=True, indent=1)
