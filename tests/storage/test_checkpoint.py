"""WAL checkpoints of SQLite engines run on the background thread, never inline in a commit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import text

from patinox.storage import _checkpoint, make_engine


def _fill(engine: object, rows: int) -> None:
    with engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body TEXT)"))
    for _ in range(rows // 100):
        with engine.begin() as conn:  # type: ignore[attr-defined]
            conn.execute(text("INSERT INTO t (body) VALUES (:b)"), [{"b": "x" * 4000}] * 100)


def test_commits_leave_checkpoints_to_the_background_pass(tmp_path: Path) -> None:
    """Connections have the automatic checkpoint off, so 2,000 pages of commits stay in the
    WAL (SQLite's default would have copied them back past 1,000); one pass checkpoints
    the whole log, and a database deleted meanwhile is not recreated by the next pass."""
    path = tmp_path / "main.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    _checkpoint._engines.pop(engine)  # the thread leaves it alone while the test fills it
    _fill(engine, 2_000)
    with engine.connect() as conn:
        log = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()[1]
    # Every frame of the fill was still in the log: no commit checkpointed on its way.
    assert log >= 2_000
    _checkpoint.register(engine, path.resolve())
    _fill(engine, 1_000)
    result = _checkpoint.checkpoint_now()[path.resolve()]
    assert result is not None
    busy, log, done = result
    assert busy == 0 and log >= 1_000 and done == log
    engine.dispose()
    for p in tmp_path.glob("main.db*"):
        p.unlink()
    _checkpoint.checkpoint_now()
    assert not list(tmp_path.glob("main.db*"))


def test_the_background_thread_checkpoints_registered_databases(tmp_path: Path) -> None:
    """Without any call from the test, the thread checkpoints the whole log of a new
    database (waits up to 60 s for it)."""
    path = tmp_path / "bg.db"
    engine = make_engine(f"sqlite:///{path}")
    _fill(engine, 1_500)
    deadline = time.monotonic() + 60
    while path.resolve() not in _checkpoint._seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.resolve() in _checkpoint._seen  # a pass checkpointed the whole log
    assert any(t.name == "patinox-wal-checkpoint" for t in threading.enumerate())
    engine.dispose()
