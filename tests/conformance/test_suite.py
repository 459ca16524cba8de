"""The shipped conformance suite (:mod:`patinox.conformance`), run as an operator would.

It runs against this machine's PostgreSQL (``PATINOX_TEST_PG_ADMIN_URL``, default
``postgresql://postgres@127.0.0.1:5432/postgres``) in a scratch database it creates and
drops, plus SQLite pool and silo. Without a reachable PostgreSQL it fails under
``CI=true`` and otherwise runs SQLite only, saying so loudly.
``PATINOX_CONFORMANCE_EXAMPLES`` sets the state machine's examples (default 15).
"""

from __future__ import annotations

import os
from pathlib import Path

from patinox.conformance import run_conformance
from tests.conftest import PG_ADMIN_URL, service_missing

EXAMPLES = int(os.environ.get("PATINOX_CONFORMANCE_EXAMPLES", "15"))


def _postgres_unreachable(url: str) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used, or ``None`` when it can."""
    from sqlalchemy import create_engine

    from patinox.storage.engine import normalise_url

    try:
        engine = create_engine(normalise_url(url))
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    except Exception as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def test_conformance_suite(tmp_path: Path) -> None:
    why = _postgres_unreachable(PG_ADMIN_URL)
    if why is not None:
        service_missing(f"PostgreSQL at {PG_ADMIN_URL}", why)
    lines: list[str] = []
    result = run_conformance(admin_url=PG_ADMIN_URL, sqlite_dir=tmp_path, examples=EXAMPLES, out=lines.append)
    print("\n".join(lines))
    details = "\n\n".join(f"--- {o.deployment} {o.check}\n{o.detail}" for o in result.failures)
    assert result.failed == 0, "\n".join(lines) + "\n\n" + details
    assert result.passed > 0
    assert lines[-1] == f"{result.passed} passed, 0 failed"
    expected = {"sqlite-pool", "sqlite-silo", "pg-pool", "pg-bridge", "pg-silo"}
    assert {o.deployment for o in result.outcomes} == expected
