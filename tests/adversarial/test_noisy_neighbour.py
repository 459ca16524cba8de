"""A noisy neighbour slows nobody else: one tenant's backlog, cap or listing costs only itself.

Attacks: a tenant keeps thousands of runs queued, fills its concurrency slot, spends its
daily budget, or lists pages of large runs. A neighbour's claims, runs and budget are
unaffected, and the shared process's work and memory stay bounded (measured in database
steps and allocated bytes, not in time). Every test performs the attack and asserts the
correct behaviour.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from patinox.runtime import Runtime
from tests.adversarial._helpers import (
    no_workers,
)
from tests.conftest import TenantHandle


@contextmanager
def _sqlite_steps(runtime: Runtime) -> Iterator[list[int]]:
    """Count SQLite virtual-machine steps (in thousands) of the statements run inside:
    a measure of the database work done, independent of the machine's speed."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    def before(conn: Any, *_: Any) -> None:
        conn.connection.driver_connection.set_progress_handler(tick, 1000)

    engine = runtime.backend.engine
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield steps
    finally:
        event.remove(engine, "before_cursor_execute", before)
        with engine.connect() as conn:
            conn.connection.driver_connection.set_progress_handler(None, 0)


def test_one_tenants_queued_backlog_does_not_slow_every_claim(runtime: Runtime, operator_key: str) -> None:
    """Attack: tenant alpha (cap 1 concurrent run) keeps a slow run in flight and queues
    thousands of async runs, well within its runs_per_day (free: 20,000). ``claim()``
    filtered candidates with a count of held runs *correlated to every queued row*, which
    re-reads the tenant's whole backlog once per queued row: the work of each claim grew
    with the square of alpha's backlog (measured: 1.7 s per claim at 4,000 queued runs,
    27 s at 16,000, on SQLite and PostgreSQL alike). Workers claim synchronously on the
    API server's event loop every 0.2 s, so every tenant's requests stall, and beta's one
    queued run waits behind alpha's backlog it was supposed to overtake.

    Correct: the database work of claiming beta's run grows at most about linearly with
    alpha's backlog (here: 4x the backlog costs well under 8x the work, not ~16x).
    """
    with no_workers(runtime) as client:
        a = TenantHandle(client, operator_key, "alpha", "free", {"max_concurrent_runs": 1})
        b = TenantHandle(client, operator_key, "beta")
        q = runtime.queue
        q.hold(a.id, "run_inflight", max_running=1, holder="api")

        def enqueue(tenant: str, first: int, n: int) -> None:
            for i in range(first, first + n):
                q.enqueue(
                    tenant, f"run_{i:06d}", weight=1, max_running=1, reserved_tokens=1, quota_period="p"
                )

        def work_to_claim_beta(i: int) -> int:
            enqueue(b.id, 900_000 + i, 1)
            with _sqlite_steps(runtime) as steps:
                claim = q.claim("worker")
            assert claim is not None and claim.tenant_id == b.id
            q.release(claim.tenant_id, claim.run_id)
            return steps[0]

        enqueue(a.id, 0, 300)
        small = work_to_claim_beta(0)
        enqueue(a.id, 300, 900)
        large = work_to_claim_beta(1)
        assert large < 8 * max(small, 1), (small, large)


def test_one_tenants_concurrency_cap_does_not_block_a_neighbour(client: TestClient, make_tenant: Any) -> None:
    """Attack (noisy neighbour): tenant A fills its concurrency slot and queues more slow
    async runs; they wait in the queue (never more than A's cap run at once) while tenant B
    still runs at once."""
    a = make_tenant("alpha", limits={"max_concurrent_runs": 1, "requests_per_minute": 100_000})
    b = make_tenant("beta", limits={"max_concurrent_runs": 1})
    slow = a.agent("slow", model="simulated:ttft_ms=300,tpot_ms=0")
    ids = [a.run(slow, "x", output_tokens=1, mode="async").json()["id"] for _ in range(3)]
    assert b.run(b.agent("fast"), "x", output_tokens=1).status_code == 200
    assert client.get("/v1/usage", headers=b.h).json()["runs_in_flight"] == 0
    for _ in range(2000):
        assert client.get("/v1/usage", headers=a.h).json()["runs_in_flight"] <= 1
        statuses = [client.get(f"/v1/runs/{i}", headers=a.h).json()["status"] for i in ids]
        if all(st == "succeeded" for st in statuses):
            break
        time.sleep(0.01)
    assert statuses == ["succeeded"] * 3


def test_one_tenants_spent_budget_does_not_refuse_a_neighbour(client: TestClient, make_tenant: Any) -> None:
    """Attack: exhaust tenant A's daily token budget; tenant B (same plan) is unaffected and
    its usage shows none of A's tokens."""
    a = make_tenant("alpha", limits={"tokens_per_day": 40})
    b = make_tenant("beta", limits={"tokens_per_day": 40})
    ag = a.agent("x")
    assert a.run(ag, "x", output_tokens=30).status_code == 200
    assert a.run(ag, "x", output_tokens=30).status_code == 429
    assert b.run(b.agent("y"), "x", output_tokens=30).status_code == 200
    assert client.get("/v1/usage", headers=b.h).json()["tokens_today"] == 31


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-bridge"], indirect=True)
def test_a_run_listing_reads_no_more_than_its_byte_budget(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a tenant stores many runs with large inputs (the API takes 1,000,000
    characters a run) and lists them with ``limit=500``. The page's byte budget (8 MiB)
    was applied after the query: every row of the page, payloads included, was fetched
    into the shared server process first and only then cut, so one listing of 500 runs
    of 1 MB still held over 500 MB, the pressure on every neighbour's memory the budget
    was added to remove.

    Correct: a page cut by its budget reads about that budget, not the whole page (here
    8 MB stored, a 256 KiB budget: the listing allocates well under half of what is
    stored); the neighbour sees none of it.
    """
    import tracemalloc

    from patinox.api.routers import tenant as tenant_routes

    a, b = make_tenant("alpha", "pro"), make_tenant("beta")
    agent = a.agent()
    b.run(b.agent(), "mine", output_tokens=1)
    store = runtime.backend.acting_on(a.id)
    big = "x" * 200_000
    for _ in range(40):
        store.create_run(
            {
                "agent_id": agent,
                "principal": a.key_id,
                "mode": "sync",
                "status": "succeeded",
                "input": big,
                "model": "simulated:instant",
                "simulated": 1,
                "input_tokens": 0,
                "output_tokens": 0,
                "tool_calls": 0,
            }
        )
    monkeypatch.setattr(tenant_routes, "RUNS_PAGE_BYTES", 256 * 1024)
    tracemalloc.start()
    try:
        r = client.get("/v1/runs?limit=500", headers=a.h)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert [x["input"] for x in r.json()] == [big]
    assert 'rel="next"' in r.headers["Link"]
    assert peak < 4_000_000, peak
    assert [x["input"] for x in client.get("/v1/runs?limit=500", headers=b.h).json()] == ["mine"]
