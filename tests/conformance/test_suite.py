"""The shipped conformance suite (:mod:`patinox.conformance`), run as an operator would.

It runs against the run's PostgreSQL (the ``pg_admin_url`` fixture: see ``tests/_services.py``)
in a scratch database it creates and drops, plus SQLite pool and silo.
``PATINOX_CONFORMANCE_EXAMPLES`` sets the state machine's examples (default 15).
"""

from __future__ import annotations

import os
from pathlib import Path

from patinox.conformance import run_conformance

EXAMPLES = int(os.environ.get("PATINOX_CONFORMANCE_EXAMPLES", "15"))


def test_conformance_suite(pg_admin_url: str, tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_conformance(admin_url=pg_admin_url, sqlite_dir=tmp_path, examples=EXAMPLES, out=lines.append)
    print("\n".join(lines))
    details = "\n\n".join(f"--- {o.deployment} {o.check}\n{o.detail}" for o in result.failures)
    assert result.failed == 0, "\n".join(lines) + "\n\n" + details
    assert result.passed > 0
    assert lines[-1] == f"{result.passed} passed, 0 failed"
    expected = {"sqlite-pool", "sqlite-silo", "pg-pool", "pg-bridge", "pg-silo"}
    assert {o.deployment for o in result.outcomes} == expected
