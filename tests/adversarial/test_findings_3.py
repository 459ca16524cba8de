"""Adversarial findings, round 3 (run queue, sync holds, run path).

Each test performs an attack and asserts the CORRECT behaviour; each failed against the
build it was written for. Docstrings describe the attack and what a fixed build must do.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from patinox.api import Runtime, create_app
from patinox.errors import StorageError
from tests.conftest import TenantHandle


def _no_workers(runtime: Runtime) -> TestClient:
    runtime.settings = dataclasses.replace(runtime.settings, embedded_workers=0)
    return TestClient(create_app(runtime=runtime), raise_server_exceptions=False)


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
    with _no_workers(runtime) as client:
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


def test_a_long_sync_run_keeps_its_concurrency_slot(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: Any
) -> None:
    """Attack: a tenant whose runs may last longer than 300 s (enterprise: run_timeout_s
    900; or an override) starts a slow synchronous run. Its concurrency slot is a queue
    hold with a fixed 300 s lease that nothing renews, so once 300 s have passed the
    reaper (every worker, every 0.2 s when idle) drops the hold as if the API process had
    died and records the run ``failed``/``interrupted`` while it is still running. The
    tenant's ``max_concurrent_runs`` then no longer counts it: the tenant can keep any
    number of long runs in flight (shared event loop, provider capacity), and its run is
    shown failed until it suddenly succeeds.

    Correct: while the run is inside its timeout it keeps its slot (a second run is
    refused 429 ``concurrency_limited``) and is not recorded as failed.
    """
    import threading
    from datetime import timedelta

    import patinox.limits.queue as queue_module
    from patinox.storage import utcnow

    a = make_tenant("alpha", limits={"max_concurrent_runs": 1, "run_timeout_s": 900})
    slow = a.agent("slow", model="simulated:ttft_ms=3000,tpot_ms=0")
    quick = a.agent("quick")
    first: list[Any] = []
    thread = threading.Thread(target=lambda: first.append(a.run(slow, "x", output_tokens=1)))
    thread.start()
    try:
        for _ in range(500):
            if runtime.queue.held(a.id):
                break
            threading.Event().wait(0.01)
        assert runtime.queue.held(a.id) == 1
        # 301 s later, still far inside the run's 900 s timeout: the reaper runs.
        later = utcnow() + timedelta(seconds=301)
        monkeypatch.setattr(queue_module, "utcnow", lambda: later)
        runtime.runs.reap_expired()
        monkeypatch.undo()
        runs = client.get("/v1/runs", headers=a.h).json()
        assert [r["status"] for r in runs] == ["running"], runs
        second = a.run(quick, "y", output_tokens=1)
        assert second.status_code == 429, second.text
        assert second.json()["error"]["code"] == "concurrency_limited"
    finally:
        thread.join()
    assert first[0].status_code == 200, first[0].text


def test_a_tenant_store_cannot_move_its_rows_into_another_tenant(runtime: Runtime, make_tenant: Any) -> None:
    """Attack: ``TenantStore`` (public API) builds its UPDATEs from the values dict it is
    given: the prebuilt run update sets every column named by a parameter, so code holding
    alpha's store that passes ``{"tenant_id": <beta>, "agent_id": <beta's agent>}`` to
    ``update_run`` (or ``tenant_id`` to ``update_agent``) re-assigns alpha's row to beta
    on SQLite, where no row-level security checks the new row. Beta's run list then holds
    a row sealed under alpha's key and every ``GET /v1/runs`` of beta fails
    (``DecryptionFailed``, a 500): one tenant's store wrote into another tenant.

    Correct: a store never writes a row's tenant id or its key columns; the change is
    refused, alpha keeps its rows and beta sees nothing new.
    """
    import contextlib

    from patinox.errors import PatinoxError

    a, b = make_tenant("alpha"), make_tenant("beta")
    a_agent, b_agent = a.agent("x"), b.agent("x")
    run_id = a.run(a_agent, "alpha's secret", output_tokens=1).json()["id"]

    sa, sb = runtime.backend.acting_on(a.id), runtime.backend.acting_on(b.id)
    with contextlib.suppress(PatinoxError):
        sa.update_run(run_id, {"status": "failed", "tenant_id": b.id, "agent_id": b_agent})
    with contextlib.suppress(PatinoxError):
        sa.settle_run(
            run_id,
            {"tenant_id": b.id, "agent_id": b_agent},
            usage=None,
            audit={"actor": "cli", "action": "run.finish", "target": run_id, "outcome": "ok"},
        )
    with contextlib.suppress(PatinoxError):
        sa.update_agent(a_agent, {"tenant_id": b.id, "name": "moved"})
    assert sb.list_runs() == []
    assert [x["id"] for x in sb.list_agents()] == [b_agent]
    assert [r["id"] for r in sa.list_runs()] == [run_id]
    assert [x["id"] for x in sa.list_agents()] == [a_agent]


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo"], indirect=True)
def test_an_async_run_that_cannot_be_queued_leaves_no_run_behind(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: make the queue write of an async run fail after admission (a lock timeout
    or any storage error there). The run row was already written: the request is refused,
    yet the tenant's run list would show a run ``queued`` for ever that no worker will ever
    take (a partial write). Pool tenants write both in one transaction; silo tenants write
    the run first, so both paths are checked.

    Correct: a refused run leaves no run row, no reservation and no count against
    ``runs_per_day`` behind; a neighbour is not affected.
    """
    a = make_tenant("alpha", limits={"runs_per_day": 1})
    b = make_tenant("beta")
    agent = a.agent("x")
    real = runtime.queue.enqueue

    def failing(tenant_id: str, *args: Any, **kwargs: Any) -> float:
        if tenant_id == a.id:
            raise StorageError("database error: OperationalError")
        return real(tenant_id, *args, **kwargs)

    monkeypatch.setattr(runtime.queue, "enqueue", failing)
    r = a.run(agent, "hi", mode="async", output_tokens=1)
    assert r.status_code == 503, r.text
    assert client.get("/v1/runs", headers=a.h).json() == []
    assert client.get("/v1/usage", headers=a.h).json()["tokens_reserved"] == 0
    assert b.run(b.agent("y"), "hi", mode="async", output_tokens=1).status_code == 202
    # The refused run did not use the tenant's one run of the day.
    monkeypatch.setattr(runtime.queue, "enqueue", real)
    assert a.run(agent, "hi", mode="async", output_tokens=1).status_code == 202


def test_limit_overrides_beyond_storable_values_are_refused(client: TestClient, operator_key: str) -> None:
    """An override too large for the queue and ledger columns is a 422 at creation, not a
    tenant whose every run fails later."""
    for name, value in (("max_concurrent_runs", 2**63), ("memory_bytes", 2**60), ("run_timeout_s", 1e12)):
        r = client.post(
            "/admin/tenants",
            json={"name": f"big-{name}".replace("_", "-"), "limits": {name: value}},
            headers={"Authorization": f"Bearer {operator_key}"},
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_request"
    assert client.get("/admin/tenants", headers={"Authorization": f"Bearer {operator_key}"}).json() == []


def test_audit_sequence_numbers_do_not_count_a_neighbours_actions(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: on the pool storage model every tenant's audit records share one table
    whose ``seq`` is a deployment-wide counter, and ``GET /v1/audit`` shows it. Alpha
    writes one audit record, waits, writes another: the gap between the two ``seq``
    values is exactly the number of audited actions of every other tenant in between
    (each run of a neighbour is one ``run.finish`` record). With one neighbour, alpha
    counts beta's runs, agent edits and memory writes minute by minute.

    Correct: the numbers alpha sees depend on alpha's records only (consecutive), and
    ``after_seq`` still pages through alpha's log.
    """
    a, b = make_tenant("alpha"), make_tenant("beta")
    client.put("/v1/memory/one", json={"value": "1"}, headers=a.h)
    b_agent = b.agent("busy")
    for _ in range(5):
        assert b.run(b_agent, "hi", output_tokens=1).status_code == 200
    client.put("/v1/memory/two", json={"value": "2"}, headers=a.h)
    seqs = [x["seq"] for x in client.get("/v1/audit", headers=a.h).json()]
    assert len(seqs) >= 3
    assert [y - x for x, y in itertools.pairwise(seqs)] == [1] * (len(seqs) - 1), seqs
    page = client.get("/v1/audit", params={"after_seq": seqs[-2]}, headers=a.h).json()
    assert [(x["seq"], x["target"]) for x in page] == [(seqs[-1], "two")]
