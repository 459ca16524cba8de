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
    with _checkpoint._pass_lock:  # the background pass waits: it would checkpoint mid-fill
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


def test_a_uri_filename_is_checkpointed_at_its_file(tmp_path: Path) -> None:
    """``sqlite:///file:PATH?uri=true`` (a supported database URL) turns the automatic
    checkpoint off too, so the background pass must find the file it names: registered at
    ``<cwd>/file:PATH`` instead, its WAL was never checkpointed and grew without bound."""
    path = tmp_path / "uri.db"
    engine = make_engine(f"sqlite:///file:{path}?uri=true")
    try:
        assert _checkpoint._engines[engine] == path.resolve()
        _fill(engine, 1_000)
        result = _checkpoint.checkpoint_now()[path.resolve()]
        assert result is not None and result[0] == 0 and result[1] >= 1_000 and result[2] == result[1]
    finally:
        engine.dispose()


def test_purge_truncates_the_wal_while_another_checkpoint_runs(tmp_path: Path, kek_url: str) -> None:
    """The purge's ``wal_checkpoint(TRUNCATE)`` answers busy, without an error, when the
    background pass (of this or another process) is checkpointing at that moment; the
    deleted tenant's page images then stayed in the ``-wal`` file. It retries until done."""
    from patinox.storage import SqlBackend, open_backend
    from patinox.storage._crypto.providers import key_provider_from_url
    from patinox.tenancy import new_id

    tenant = new_id("tn")
    path = tmp_path / "purge.db"
    backend: SqlBackend = open_backend(f"sqlite:///{path}", key_provider=key_provider_from_url(kek_url))
    _checkpoint._engines.pop(backend.engine)  # only the competing pass below checkpoints
    with backend.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE plugin_data (tenant_id TEXT, v TEXT)")
        conn.exec_driver_sql(f"INSERT INTO plugin_data VALUES ('{tenant}', 'x')")
    _fill(backend.engine, 2_000)
    stop = threading.Event()

    def compete() -> None:
        import sqlite3

        conn = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            while not stop.is_set():
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            conn.close()

    other = threading.Thread(target=compete)
    other.start()
    try:
        for _ in range(5):
            _fill(backend.engine, 200)
            backend.purge_tenant(tenant)
            assert Path(f"{path}-wal").stat().st_size == 0
    finally:
        stop.set()
        other.join()
        backend.close()
