"""On PostgreSQL, a run queued by one process wakes an idle worker of another at once
(LISTEN/NOTIFY), instead of at the worker's next poll."""

from __future__ import annotations

import asyncio

import pytest

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.runtime import Runtime, Settings
from patinox.storage import open_backend
from patinox.storage.crypto import key_provider_from_url
from patinox.tenancy import TenantContext
from tests.conftest import Deployment

#: The idle worker's poll: without a notification it would not look again for this long.
POLL_S = 600.0


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_a_run_queued_by_another_process_wakes_an_idle_worker(
    runtime: Runtime, deployment: Deployment, kek_url: str
) -> None:
    """The "API process" is ``runtime``; the "worker process" is a second runtime on its
    own engine (its own connections), as ``patinox worker`` would be. The worker starts
    on an empty queue and goes idle for :data:`POLL_S`; the API process then queues a run
    and the worker executes it, woken by the notification alone (its own process queued
    nothing, so no in-process wake-up fired)."""
    tenant = runtime.tenants.create(TenantSpec(name="alpha"), actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant"))
    backend = open_backend(
        deployment.db_url, owner_url=deployment.owner_url, key_provider=key_provider_from_url(kek_url)
    )
    other = Runtime.build(
        Settings(database_url=deployment.db_url, owner_url=deployment.owner_url, kek_url=kek_url),
        backend=backend,
    )
    worker = other.worker(concurrency=1, holder="wakeup-test")
    worker._poll_s = POLL_S

    async def go() -> str:
        stop = asyncio.Event()
        working = asyncio.create_task(worker.run(stop))
        while worker.listener is None or not worker.listener.connected.is_set():
            await asyncio.sleep(0.01)
        for _ in range(50):  # let the worker find the queue empty and go idle
            await asyncio.sleep(0.01)
        assert worker.completed == 0
        queued = await runtime.runs.start(ctx, agent["id"], RunRequest(input="later", mode="async"))
        # A hang guard, not a speed check: without the notification nothing would happen
        # for POLL_S seconds.
        async with asyncio.timeout(POLL_S / 2):
            while worker.completed == 0:
                await asyncio.sleep(0.01)
        stop.set()  # ends the worker's idle wait at once
        await working
        return str(queued["id"])

    try:
        run_id = asyncio.run(go())
        assert worker.listener is not None and worker.listener.notified >= 1
        assert not worker.listener.connected.is_set()  # closed with the worker
    finally:
        backend.close()
    assert runtime.backend.tenant_store(ctx).get_run(run_id)["status"] == "succeeded"
