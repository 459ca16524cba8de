"""The driver-cursor write path stores exactly what SQLAlchemy's own execution stores,
raises what it raises, and is seen by statement listeners."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, delete, event, insert, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from patinox.errors import AlreadyExists
from patinox.storage import _fast, execute_write, make_engine, translate_errors
from patinox.storage import _schema as s


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    s.metadata.create_all(e)
    at = datetime(2026, 12, 1, tzinfo=UTC)
    with e.begin() as conn:  # the rows runs reference
        conn.execute(
            insert(s.tenants),
            {
                "id": "tn_a",
                "name": "a",
                "plan": "free",
                "state": "active",
                "isolation_level": "namespace",
                "limit_overrides": {},
                "created_at": at,
                "updated_at": at,
            },
        )
        conn.execute(
            insert(s.agents),
            {
                "tenant_id": "tn_a",
                "id": "ag_1",
                "name": "a",
                "instructions": "i",
                "model": "simulated:instant",
                "tools": [],
                "created_at": at,
                "updated_at": at,
            },
        )
    yield e
    e.dispose()


def _run(run_id: str) -> dict[str, Any]:
    at = datetime(2026, 12, 1, 13, 5, 7, 123456, tzinfo=UTC)
    return {
        "tenant_id": "tn_a",
        "id": run_id,
        "agent_id": "ag_1",
        "principal": "key_1",
        "mode": "sync",
        "status": "failed",
        "input": b"\x00sealed\xff",
        "requested_output_tokens": None,
        "model": "simulated:instant",
        "simulated": 1,
        "input_tokens": 3,
        "output_tokens": 4,
        "tool_calls": 0,
        "error": {"code": "run_failed", "reason": "timeout", "nested": [1, "x"]},
        "created_at": at,
        "started_at": at,
        "finished_at": None,
        "duration_ms": 1.5,
    }


def _raw(tmp_path: Path, table: str, key: str) -> tuple[Any, ...]:
    with sqlite3.connect(tmp_path / "x.db") as c:
        row = c.execute(f"SELECT * FROM {table} WHERE id = ?", (key,)).fetchone()
    assert row is not None
    return tuple(row)


def test_an_insert_stores_the_same_bytes_as_sqlalchemy(engine: Engine, tmp_path: Path) -> None:
    with engine.begin() as conn:
        conn.execute(insert(s.runs), _run("run_sa"))
        assert execute_write(conn, insert(s.runs), _run("run_fast")) == 1
    sa, fast = _raw(tmp_path, "runs", "run_sa"), _raw(tmp_path, "runs", "run_fast")
    assert sa[2:] == fast[2:] and fast[1] == "run_fast"


def test_an_update_and_a_delete_match_sqlalchemy(engine: Engine, tmp_path: Path) -> None:
    stmt = update(s.runs).where(s.runs.c.tenant_id == "tn_a", s.runs.c.id == bindparam("b_id"))
    later = datetime(2026, 12, 2, 0, 0, 1, tzinfo=UTC)
    values = {"status": "succeeded", "output": b"out", "finished_at": later, "error": None}
    with engine.begin() as conn:
        for rid in ("run_sa", "run_fast"):
            conn.execute(insert(s.runs), _run(rid))
        conn.execute(stmt, {**values, "b_id": "run_sa"})
        assert execute_write(conn, stmt, {**values, "b_id": "run_fast"}) == 1
        assert execute_write(conn, stmt, {**values, "b_id": "run_missing"}) == 0
    assert _raw(tmp_path, "runs", "run_sa")[2:] == _raw(tmp_path, "runs", "run_fast")[2:]
    with engine.begin() as conn:
        gone = delete(s.runs).where(s.runs.c.id == bindparam("b_id"))
        assert execute_write(conn, gone, {"b_id": "run_fast"}) == 1
        assert execute_write(conn, gone, {"b_id": "run_fast"}) == 0


def test_a_duplicate_key_raises_as_sqlalchemy_does(engine: Engine) -> None:
    with pytest.raises(AlreadyExists), translate_errors(), engine.begin() as conn:
        execute_write(conn, insert(s.runs), _run("run_1"))
        execute_write(conn, insert(s.runs), _run("run_1"))
    with engine.connect() as conn:  # the failed transaction left nothing
        assert conn.execute(s.runs.select()).first() is None


def test_on_conflict_do_nothing_counts_zero_rows(engine: Engine) -> None:
    stmt = sqlite_insert(s.queue_tenants).on_conflict_do_nothing()
    with engine.begin() as conn:
        assert execute_write(conn, stmt, {"tenant_id": "tn_a", "last_tag": 0.0}) == 1
        assert execute_write(conn, stmt, {"tenant_id": "tn_a", "last_tag": 5.0}) == 0


def test_listeners_see_every_statement(engine: Engine) -> None:
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_: seen.append(sql))
    with engine.begin() as conn:
        execute_write(conn, insert(s.runs), _run("run_1"))
    assert any(sql.startswith("INSERT INTO runs") for sql in seen)


def test_python_side_defaults_take_the_ordinary_path(engine: Engine, tmp_path: Path) -> None:
    row = _run("run_defaults")
    for column in ("input_tokens", "output_tokens", "tool_calls"):  # default=0 in Python
        del row[column]
    with engine.begin() as conn:
        assert execute_write(conn, insert(s.runs), row) == 1
    stored = _raw(tmp_path, "runs", "run_defaults")
    assert stored.count(0) >= 3
    plans = [plan for (_, names, _), (_, _, plan) in _fast._PLANS.items() if "input_tokens" not in names]
    assert None in plans  # compiled, found to need defaults, and left to SQLAlchemy
