"""Concurrency caps and daily run counts hold under concurrent requests, long runs and cap changes.

Attacks: requests released together against ``max_concurrent_runs`` or ``runs_per_day``,
a cap lowered while runs wait in the queue, a synchronous run that outlives the reaper's
lease or runs to the longest timeout allowed. Exactly the cap is admitted, a running run
keeps its slot until it is settled, and the slot and reservation are given back once.
Every test performs the attack and asserts the correct behaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.control import AgentSpec, RunRequest, TenantUpdate
from patinox.errors import RunFailed
from patinox.runtime import Runtime
from patinox.storage import utcnow
from patinox.tenancy import TenantContext
from tests.adversarial._helpers import (
    new_tenant_context,
)
from tests.conftest import Deployment, TenantHandle, auth


def test_concurrent_runs_never_exceed_the_cap_under_a_barrier(client: TestClient, make_tenant: Any) -> None:
    """Attack: 8 synchronous run requests released together against ``max_concurrent_runs=3``;
    exactly 3 are admitted (the slot check-and-take is atomic)."""
    a = make_tenant("alpha", limits={"max_concurrent_runs": 3})
    agent = a.agent("slow", model="simulated:ttft_ms=400,tpot_ms=0")
    codes: list[int] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        codes.append(a.run(agent, "x", output_tokens=1).status_code)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * 3 + [429] * 5


def test_async_runs_per_day_are_not_overbooked_by_concurrent_requests(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: fire 8 async runs at once at a tenant with runs_per_day=3 and hope the
    counter races. Exactly 3 are admitted."""
    a = make_tenant("alpha", limits={"runs_per_day": 3})
    agent = a.agent("x")
    codes: list[int] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        codes.append(a.run(agent, "hi", mode="async", output_tokens=1).status_code)

    ts = [threading.Thread(target=go) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(codes) == [202] * 3 + [429] * 5


def test_queued_runs_obey_a_lowered_concurrency_cap(runtime: Runtime, operator_key: str) -> None:
    """Attack: a tenant queues 6 async runs while its ``max_concurrent_runs`` is 6 (or while
    on a bigger plan); the operator then lowers the cap to 1 (abuse, downgrade). Each
    ``run_queue`` row keeps the ``max_running`` it was enqueued with and ``claim()`` compares
    against that stale figure, so workers still run all 6 at once — the new cap is bypassed
    for every run queued before the change (up to runs_per_day of them).

    Correct: a claim checks the tenant's current cap; at most 1 run is claimed.
    """
    runtime.settings = dataclasses.replace(runtime.settings, embedded_workers=0)
    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as client:
        a = TenantHandle(client, operator_key, "alpha", "free", {"max_concurrent_runs": 6})
        agent = a.agent("x")
        for _ in range(6):
            assert a.run(agent, "hi", mode="async", output_tokens=1).status_code == 202
        r = client.patch(
            f"/admin/tenants/{a.id}", json={"limits": {"max_concurrent_runs": 1}}, headers=auth(operator_key)
        )
        assert r.status_code == 200, r.text
        claims = []
        for _ in range(6):
            c = runtime.queue.claim("test-worker")
            if c is not None:
                claims.append(c)
        assert len(claims) <= 1, f"{len(claims)} runs claimed at once under a cap of 1"


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


def test_a_sync_run_with_the_longest_timeout_keeps_its_hold_until_settlement(
    runtime: Runtime, deployment: Deployment
) -> None:
    """Attack: a tenant's ``run_timeout_s`` override is set to its bound, 30 days. A
    synchronous run's hold must outlive the run's timeout by the settlement grace (60 s),
    or the reaper takes it for a dead process's run while it still runs; but the lease was
    capped at exactly 30 days. Reaping the hold in that last minute charged the whole
    reservation and gave it back, and the live run's own settlement then gave the
    reservation back a second time: the ledger's ``reserved`` went negative, which raises
    the tenant's budget for the rest of the day by that much.

    Correct: the hold lives at least the run's timeout plus 60 s; the reaper leaves it and
    the run is settled once.
    """
    ctx = new_tenant_context(runtime, deployment)
    runtime.tenants.update(ctx.tenant_id, TenantUpdate(limits={"run_timeout_s": 30 * 86_400}), actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=ctx.tenant_id, name="k2", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext) and ctx.limits.run_timeout_s == 30 * 86_400
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:ttft_ms=0,tpot_ms=250"))

    async def scenario() -> int:
        run = asyncio.create_task(
            runtime.runs.start(ctx, agent["id"], RunRequest(input="hello", output_tokens=40))
        )
        while not runtime.runs.queue.held(ctx.tenant_id):
            await asyncio.sleep(0.02)
        # 30 s into the settlement grace of a run that ran to its timeout.
        reaped = runtime.runs.reap_expired(utcnow() + timedelta(seconds=30 * 86_400 + 30))
        await runtime.runs.stop_tenant(ctx.tenant_id)
        with pytest.raises(RunFailed):
            await run
        return reaped

    assert asyncio.run(scenario()) == 0
    assert runtime.budget.spent_today(ctx.tenant_id)[1] == 0
