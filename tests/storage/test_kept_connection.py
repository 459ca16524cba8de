"""The owner thread's kept SQLite connection: reused between its transactions, never shared,
never left holding a transaction, replaced after a dispose."""

from __future__ import annotations

import gc
import sqlite3
import threading
import time
import weakref
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, text

from patinox.storage import make_engine
from patinox.storage.engine import begin, dispose


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    made = make_engine(f"sqlite:///{tmp_path / 'kept.db'}")
    with made.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
    yield made
    dispose(made)


def _dbapi(conn: Connection) -> object:
    return conn.connection.driver_connection


def test_the_owner_thread_reuses_one_connection_and_others_take_their_own(engine: Engine) -> None:
    with begin(engine) as first:
        first.execute(text("INSERT INTO t (v) VALUES ('a')"))
    with begin(engine) as second:
        assert second is first  # the kept connection, not a new checkout
        # A transaction begun inside another on the same thread cannot share it.
        with begin(engine) as nested:
            assert nested is not first
    seen: list[Connection] = []
    worker = threading.Thread(target=lambda: seen.append(begin(engine).__enter__()))
    worker.start()
    worker.join()
    assert seen and seen[0] is not first  # another thread: the ordinary pool path
    seen[0].rollback()
    seen[0].close()


def test_an_error_rolls_back_and_the_connection_stays_usable(engine: Engine) -> None:
    with pytest.raises(RuntimeError), begin(engine) as conn:
        conn.execute(text("INSERT INTO t (v) VALUES ('lost')"))
        raise RuntimeError("boom")
    with begin(engine) as again:
        assert again is conn
        assert again.execute(text("SELECT count(*) FROM t WHERE v = 'lost'")).scalar() == 0


def test_between_transactions_it_holds_no_lock_or_snapshot(engine: Engine, tmp_path: Path) -> None:
    """Another process's writer and a full checkpoint never wait for the kept connection."""
    with begin(engine) as conn:
        conn.execute(text("INSERT INTO t (v) VALUES ('x')"))
    other = sqlite3.connect(tmp_path / "kept.db", timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # fails at once (timeout 0) if a writer held on
        other.execute("INSERT INTO t (v) VALUES ('y')")
        other.execute("COMMIT")
        # The background checkpointer's own pass may be running this instant (it gives
        # way, and so does this one): a held snapshot would keep answering busy every time.
        for _ in range(200):
            busy, _log, _done = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy == 0:
                break
            time.sleep(0.01)
        assert busy == 0  # no reader held a snapshot: the whole log was checkpointed
    finally:
        other.close()
    with begin(engine) as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 2  # sees the other write


def test_a_broken_connection_is_replaced(engine: Engine) -> None:
    with begin(engine) as conn:
        pass
    conn.invalidate()
    with begin(engine) as fresh:
        assert fresh is not conn
        assert fresh.execute(text("SELECT 1")).scalar() == 1


def test_dispose_closes_it_and_a_plain_dispose_is_noticed(engine: Engine) -> None:
    with begin(engine) as conn:
        pass
    raw = _dbapi(conn)
    engine.dispose()  # a new pool: the kept connection belongs to the old one
    with begin(engine) as after:
        assert after is not conn and _dbapi(after) is not raw
    assert conn.closed
    dispose(engine)
    assert after.closed
    with begin(engine) as reopened:  # the engine stays usable, as after Engine.dispose()
        assert reopened.execute(text("SELECT count(*) FROM t")).scalar() == 0


def test_a_dispose_on_another_thread_does_not_lose_the_owners_transaction(engine: Engine) -> None:
    # An evicted silo engine is disposed on whichever thread evicted it, possibly while
    # the owner thread is inside a transaction on it: that transaction must commit (as
    # it does on a connection checked out of a pool that Engine.dispose() replaced).
    with begin(engine) as conn:
        conn.execute(text("INSERT INTO t (v) VALUES ('kept')"))
        other = threading.Thread(target=dispose, args=(engine,))
        other.start()
        other.join()
        conn.execute(text("INSERT INTO t (v) VALUES ('after')"))
    assert conn.closed  # closed once the transaction ended, not kept
    with engine.connect() as check:
        assert check.execute(text("SELECT v FROM t ORDER BY id")).scalars().all() == ["kept", "after"]


def test_an_engine_used_after_its_dispose_keeps_nothing_and_is_freed(tmp_path: Path) -> None:
    # A silo engine evicted from the LRU (disposed) may still serve a store that holds
    # its placement; a connection kept again then would never be closed, and it holds
    # the engine (and its open database file) alive for the life of the process.
    made = make_engine(f"sqlite:///{tmp_path / 'evicted.db'}")
    with begin(made) as conn:
        conn.execute(text("SELECT 1"))
    dispose(made)
    with begin(made) as conn:
        conn.execute(text("SELECT 1"))
    assert conn.closed  # an ordinary engine.begin() connection, returned to the pool
    ref = weakref.ref(made)
    del made, conn
    gc.collect()
    assert ref() is None
