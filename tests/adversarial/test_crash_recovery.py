"""A storage failure or a stalled worker part-way through a run leaves nothing half-done.

Attacks: the queue write, the run-row write or the control-plane part of the settlement
transaction fails (a lock timeout, a deadlock); a worker stalls past its lease and its run
is claimed again. A refused run leaves no row, reservation, slot or daily count behind; a
run whose settlement partly failed keeps its result, usage and audit records; a
reservation is given back exactly once. Every test performs the attack and asserts the
correct behaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.errors import StorageError
from patinox.runtime import Runtime
from patinox.storage import TenantStore, utcnow
from tests.conftest import TenantHandle


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


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-bridge"], indirect=True)
def test_a_sync_run_whose_row_cannot_be_written_does_not_count_against_runs_per_day(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: make the run-row write of a synchronous run fail after admission (a storage
    error in the tenant's own database; or the agent deleted in between, a foreign-key
    violation). Pool tenants write slot, quotas and row in one transaction, so all of it
    rolls back; silo tenants write the row after the control-plane transaction and
    compensate, but the compensation returned the tokens and the slot only: the run
    that never existed still counted against ``runs_per_day``. README: runs_per_day is
    "given back when its admission fails after that".

    Correct: a refused run leaves no run row, no reservation, no slot and no count against
    ``runs_per_day`` behind, on both paths; a neighbour is not affected.
    """
    a = make_tenant("alpha", limits={"runs_per_day": 1})
    b = make_tenant("beta")
    agent = a.agent("x")
    real = TenantStore.apply

    def failing(self: TenantStore, write: Any, *, conn: Any = None) -> None:
        if self.tenant_id == a.id and len(write.statements) == 1:  # the run row's insert
            raise StorageError("database error: OperationalError")
        real(self, write, conn=conn)

    monkeypatch.setattr(TenantStore, "apply", failing)
    r = a.run(agent, "hi", output_tokens=1)
    assert r.status_code == 503, r.text
    assert client.get("/v1/runs", headers=a.h).json() == []
    usage = client.get("/v1/usage", headers=a.h).json()
    assert (usage["tokens_reserved"], usage["runs_in_flight"]) == (0, 0)
    assert b.run(b.agent("y"), "hi", output_tokens=1).status_code == 200
    monkeypatch.setattr(TenantStore, "apply", real)
    # The refused run did not use the tenant's one run of the day.
    again = a.run(agent, "hi", output_tokens=1)
    assert again.status_code == 200, again.text


def _fail_joined_release_once(runtime: Runtime, tenant_id: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the tenant's first slot release inside a joined settlement transaction fail,
    as a lock timeout or a deadlock would; returns the run ids it failed for."""
    real = runtime.queue.release
    failures: list[str] = []

    def failing(tid: str, run_id: str, *, conn: Any = None) -> None:
        if tid == tenant_id and conn is not None and not failures:
            failures.append(run_id)
            raise StorageError("database error: OperationalError")
        real(tid, run_id, conn=conn)

    monkeypatch.setattr(runtime.queue, "release", failing)
    return failures


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_a_failed_settlement_transaction_gives_the_tokens_back(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: make the settlement transaction of a pool tenant's synchronous run fail
    after the token settlement statement ran (here: the slot release in the same
    transaction hits a storage error, as a lock timeout or a deadlock would). The
    transaction rolls back, the settlement included; the fallback then settles and
    releases on its own, but the reservation had already been marked settled, so the
    fallback skipped it: the run's worst case stayed reserved until the end of the UTC
    day. A tenant (or a flaky database) thus shrinks the tenant's daily budget run by run
    until every run is refused ``quota_exceeded``.

    Correct: after the failed run nothing of it stays reserved, its slot is free, and the
    neighbour is unaffected.
    """
    a = make_tenant("alpha")
    b = make_tenant("beta")
    agent = a.agent("x")
    failures = _fail_joined_release_once(runtime, a.id, monkeypatch)
    a.run(agent, "hello there", output_tokens=2)
    assert failures, "the settlement never joined the control-plane transaction"
    usage = client.get("/v1/usage", headers=a.h).json()
    assert usage["runs_in_flight"] == 0
    assert usage["tokens_reserved"] == 0, usage
    assert b.run(b.agent("y"), "hi", output_tokens=1).status_code == 200
    assert client.get("/v1/usage", headers=b.h).json()["tokens_reserved"] == 0


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_a_failed_settlement_transaction_does_not_lose_the_runs_result(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: as above, the pool tenant's one settlement transaction fails in its
    control-plane part (the slot release). The run's result, usage record and audit
    record were in the same transaction and rolled back with it, while the fallback
    charged the tokens the model used: the run stayed ``running`` for ever (no reaper
    looks at it once its slot is gone), the tokens were billed with no usage record
    behind them, and the audit log did not show the run. Before the single transaction
    (and still for bridge and silo tenants) a failed release never touched the run's
    own records.

    Correct: the run's own records are still written when only the control-plane part of
    its settlement failed: the run is finished, its usage record accounts for every token
    charged, and the neighbour sees none of it.
    """
    a = make_tenant("alpha")
    b = make_tenant("beta")
    agent = a.agent("x")
    failures = _fail_joined_release_once(runtime, a.id, monkeypatch)
    r = a.run(agent, "hello there", output_tokens=2)
    assert failures, "the settlement never joined the control-plane transaction"
    assert r.status_code == 200, r.text
    [run] = client.get("/v1/runs", headers=a.h).json()
    assert run["status"] == "succeeded", run
    usage = client.get("/v1/usage", headers=a.h).json()
    billed = sum(r["input_tokens"] + r["output_tokens"] for r in usage["records"])
    assert usage["tokens_today"] == billed > 0, usage
    assert (usage["tokens_reserved"], usage["runs_in_flight"]) == (0, 0)
    assert "run.finish" in [x["action"] for x in client.get("/v1/audit", headers=a.h).json()]
    assert client.get("/v1/runs", headers=b.h).json() == []
    assert client.get("/v1/usage", headers=b.h).json()["records"] == []


def test_a_stalled_worker_whose_run_was_requeued_does_not_give_its_reservation_back_twice(
    runtime: Runtime, operator_key: str
) -> None:
    """Attack: a worker claims an async run, stalls past its lease (its renewals fail), the
    reaper puts the run back with its reservation, and a second worker claims it. Then
    both finish: the stalled one runs the agent, the second finds the run done. Each gave
    the run's reservation back, so the day's ``reserved`` went below zero by one
    reservation, which the tenant's next runs could spend on top of ``tokens_per_day``.

    Correct: the reservation is given back once, by the worker holding the claim; the
    tokens the stalled worker's execution used are still charged.
    """
    runtime.settings = dataclasses.replace(runtime.settings, embedded_workers=0)
    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as client:
        a = TenantHandle(client, operator_key, "alpha")
        agent = a.agent("x")
        r = a.run(agent, "hello there", mode="async", output_tokens=1)
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]
        assert runtime.budget.spent_today(a.id)[1] > 0  # the run's worst case, reserved

        stalled = runtime.queue.claim("stalled", lease_s=30)
        assert stalled is not None
        assert runtime.queue.requeue_expired(now=utcnow() + timedelta(seconds=31)) == (1, [])
        second = runtime.queue.claim("second", lease_s=30)
        assert second is not None and second.run_id == run_id

        async def both() -> None:
            await runtime.runs.execute_claim(stalled)
            await runtime.runs.execute_claim(second)

        asyncio.run(both())
        run = client.get(f"/v1/runs/{run_id}", headers=a.h).json()
        assert run["status"] == "succeeded", run
        spent, reserved = runtime.budget.spent_today(a.id)
        assert reserved == 0
        assert spent == run["input_tokens"] + run["output_tokens"]
        assert runtime.queue.held(a.id) == 0
        assert runtime.queue.depth(a.id) == 0
