"""Row locks of the fair queue on PostgreSQL (SQLite serialises every writer on one lock)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from patinox.limits import FairRunQueue
from patinox.storage import SqlBackend
from tests.limits.test_queue import _enqueue, _tenant

pytestmark = pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)


def test_a_claim_skips_a_tenant_whose_queue_row_another_transaction_holds(
    backend: SqlBackend,
) -> None:
    """PostgreSQL: while another transaction holds tenant X's queue row (a worker's claim, a
    sync run's admission), a claim takes tenant Y's run instead of waiting on X. Waiting
    let two workers that lock candidate tenants in opposite orders deadlock."""
    q = FairRunQueue(backend)
    x, y = _tenant(backend, "x"), _tenant(backend, "y")
    _enqueue(q, x, 1)  # first in fair order
    _enqueue(q, y, 1)
    holder = backend.engine.connect()
    tx = holder.begin()
    holder.execute(text("SELECT set_config('patinox.scope', 'control', true)"))
    holder.execute(text("SELECT 1 FROM queue_tenants WHERE tenant_id = :t FOR UPDATE"), {"t": x})
    claimed: list[str] = []
    worker = threading.Thread(target=lambda: claimed.append(q.claim("w").tenant_id))  # type: ignore[union-attr]
    worker.start()
    worker.join(timeout=60)  # a waiting claim would still be blocked here
    tx.rollback()
    holder.close()
    worker.join()
    assert claimed == [y]
