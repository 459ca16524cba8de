"""The run path on a real PostgreSQL deployment through the storage executor writes what it
writes inline: the same run rows, usage records, audit records and settlement (ledger,
slots); and a run whose caller goes away while its settlement is under way is settled
exactly once, its settlement finished in its storage thread.

Before, every storage call of the run path ran on the event loop's thread: on PostgreSQL
each round trip stopped every other request of the process (a light tenant's too)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import ConcurrencyLimited
from patinox.isolation import Template
from patinox.limits import FairStorageExecutor, InlineStorage
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend
from patinox.storage.engine import normalise_url
from patinox.tenancy import IsolationLevel, LimitOverrides, StorageModel, TenantContext
from tests.conftest import Deployment

MODEL = "simulated:instant"


@pytest.fixture
def make_runtime(
    deployment: Deployment,
    backend: SqlBackend,
    kek_url: str,
    exec_template: Template,
    exec_root: Path,
    exec_cgroup_prefix: str,
) -> Iterator[Any]:
    made: list[Runtime] = []

    def make(threads: int) -> Runtime:
        settings = Settings(
            database_url=deployment.db_url,
            owner_url=deployment.owner_url,
            kek_url=kek_url,
            exec_root=exec_root,
            exec_cgroup_prefix=exec_cgroup_prefix,
            storage_threads=threads,
        )
        rt = Runtime.build(settings, backend=backend, template=exec_template)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def _tenant(
    rt: Runtime, name: str, model: str, agent_model: str = MODEL, **limits: Any
) -> tuple[TenantContext, str]:
    spec = TenantSpec(
        name=name,
        storage_model=StorageModel(model),
        isolation_level=IsolationLevel.NAMESPACE,
        limits=LimitOverrides(**limits),
    )
    t = rt.tenants.create(spec, actor="test")
    ctx = rt.keys.authenticate(rt.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret)
    assert isinstance(ctx, TenantContext)
    agent = rt.agents.create(ctx, AgentSpec(name="a", model=agent_model, tools=["memory_put"]))
    return ctx, str(agent["id"])


async def _workload(rt: Runtime, model: str, tag: str) -> dict[str, Any]:
    """Two tenants' runs at once: six synchronous runs of a heavy tenant (one refused at its
    cap of five), one synchronous and one queued run of a light tenant, the queued one then
    claimed and executed; what they left in storage, with ids and times left out."""
    # The heavy runs last long enough (300 ms to the first token) that all six overlap, so
    # exactly one is refused at the cap whatever the schedule.
    heavy, heavy_agent = _tenant(
        rt, f"heavy-{tag}", model, agent_model="simulated:ttft_ms=300", max_concurrent_runs=5
    )
    light, light_agent = _tenant(rt, f"light-{tag}", model)
    # One prompt for all: which of them the cap refuses is the schedule's choice.
    prompts = ['a question /call memory_put {"key": "k", "value": "v"}'] * 6
    results = await asyncio.gather(
        *(rt.runs.start(heavy, heavy_agent, RunRequest(input=p, output_tokens=7)) for p in prompts),
        rt.runs.start(light, light_agent, RunRequest(input="hello", output_tokens=3)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and all(isinstance(r, ConcurrencyLimited) for r in refused), refused
    queued = await rt.runs.start(light, light_agent, RunRequest(input="later", output_tokens=4, mode="async"))
    assert queued["status"] == "queued"
    claim = rt.queue.claim("w", lease_s=30)
    assert claim is not None
    done = await rt.runs.execute_claim(claim)
    assert done is not None and done["status"] == "succeeded"
    return {"heavy": _left(rt, heavy), "light": _left(rt, light), "refused": len(refused)}


def _left(rt: Runtime, ctx: TenantContext) -> dict[str, Any]:
    store = rt.backend.tenant_store(ctx)
    runs = sorted(
        (r["input"], r["status"], r["output"], r["input_tokens"], r["output_tokens"], r["tool_calls"])
        for r in store.list_runs(limit=100)
    )
    usage = sorted((u["input_tokens"], u["output_tokens"], u["tool_calls"]) for u in store.list_usage())
    audit = sorted(a["action"] for a in store.list_audit(limit=1000) if a["action"].startswith("run."))
    return {
        "runs": runs,
        "usage": usage,
        "audit": audit,
        "ledger": rt.budget.spent_today(ctx.tenant_id),
        "held": rt.queue.held(ctx.tenant_id),
    }


@pytest.mark.parametrize("deployment", ["pg-pool", "pg-silo"], indirect=True)
def test_the_run_path_through_storage_threads_leaves_what_inline_leaves(
    make_runtime: Any, deployment: Deployment
) -> None:
    inline, offloaded = make_runtime(0), make_runtime(3)
    assert isinstance(inline.storage, InlineStorage)
    assert isinstance(offloaded.storage, FairStorageExecutor)
    expected = asyncio.run(_workload(inline, deployment.storage_model, "inline"))
    before = offloaded.storage.completed
    got = asyncio.run(_workload(offloaded, deployment.storage_model, "threads"))
    # Lookups, admissions, settlements and the claim's reading went through the threads.
    assert offloaded.storage.completed - before >= 2 * 8
    assert got == expected
    assert got["heavy"]["held"] == got["light"]["held"] == 0
    assert got["heavy"]["ledger"][1] == got["light"]["ledger"][1] == 0  # nothing left reserved


@pytest.mark.parametrize("settlement", ["running", "waiting"])
@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_a_run_whose_caller_goes_away_mid_settlement_is_settled_once(
    make_runtime: Any, deployment: Deployment, settlement: str
) -> None:
    """``running``: the settlement waits on a row lock in its storage thread when the
    caller goes away; ``waiting``: it waits for the one storage thread, held by another
    call."""
    rt = make_runtime(1)
    executor = rt.storage
    assert isinstance(executor, FairStorageExecutor)
    gate = threading.Event()
    # A reply that takes long enough to lock the ledger after the run's admission.
    ctx, agent_id = _tenant(rt, "alpha", deployment.storage_model, "simulated:ttft_ms=1500,tpot_ms=0")
    store = rt.backend.tenant_store(ctx)
    assert deployment.admin_url is not None
    # A superuser session on the deployment's database (row-level security does not hide
    # the tenant's ledger rows from it).
    database = make_url(normalise_url(deployment.db_url)).database
    admin = create_engine(make_url(normalise_url(deployment.admin_url)).set(database=database))

    async def scenario() -> str:
        # The tenant's ledger rows are locked by another session: the run's settlement,
        # which spends its tokens there, waits on the lock in its storage thread.
        locker = admin.connect()
        try:
            started = asyncio.ensure_future(
                rt.runs.start(ctx, agent_id, RunRequest(input="hello there", output_tokens=5))
            )
            while not store.list_runs():  # admitted: its row is written
                await asyncio.sleep(0.01)
            (run_id,) = [r["id"] for r in store.list_runs()]
            if settlement == "running":
                await asyncio.to_thread(
                    locker.execute,
                    text("SELECT 1 FROM quota_ledger WHERE tenant_id = :t FOR UPDATE"),
                    {"t": ctx.tenant_id},
                )
                while not await asyncio.to_thread(_waiting_on_a_lock, admin):
                    assert not started.done()
                    await asyncio.sleep(0.01)
            else:
                held = asyncio.ensure_future(executor.system(gate.wait))
                while executor.waiting < 1:  # the settlement, behind the held thread
                    assert not started.done()
                    await asyncio.sleep(0.01)
            started.cancel()  # the caller goes away while its run settles
            for _ in range(20):
                await asyncio.sleep(0)
            # The settlement goes on.
            if settlement == "running":
                await asyncio.to_thread(locker.rollback)
            else:
                gate.set()
                await held
            with pytest.raises(asyncio.CancelledError):
                await started
            return run_id
        finally:
            locker.close()

    try:
        run_id = asyncio.run(scenario())
    finally:
        admin.dispose()
    run = store.get_run(run_id)
    assert run["status"] == "succeeded" and run["output_tokens"] == 5
    used = run["input_tokens"] + run["output_tokens"]
    # Spent once, nothing reserved, the slot freed, one usage and one finish record.
    assert rt.budget.spent_today(ctx.tenant_id) == (used, 0)
    assert rt.queue.held(ctx.tenant_id) == 0
    assert [(u["input_tokens"], u["output_tokens"]) for u in store.list_usage()] == [(run["input_tokens"], 5)]
    assert [a["action"] for a in store.list_audit(limit=100)].count("run.finish") == 1


def _waiting_on_a_lock(admin: Any) -> bool:
    with admin.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE NOT l.granted AND a.datname = current_database()"
                )
            ).scalar()
        )


@pytest.mark.parametrize("deployment", ["pg-pool", "pg-bridge"], indirect=True)
def test_requests_authenticate_in_the_storage_threads_and_keep_their_tenant(
    runtime: Runtime, make_tenant: Any
) -> None:
    executor = runtime.storage
    assert isinstance(executor, FairStorageExecutor)
    a, b = make_tenant("alpha"), make_tenant("beta")
    agent = a.agent()
    before = executor.completed
    r = a.run(agent)
    assert r.status_code == 200, r.text
    # The key and the rate limits (one system call), the agent's lookup, the admission,
    # the settlement: all in the threads.
    assert executor.completed - before >= 4
    assert r.headers["RateLimit-Policy"]
    # The other tenant's key sees nothing of it (the same answer as a missing run).
    assert a.client.get(f"/v1/runs/{r.json()['id']}", headers=b.h).status_code == 404
    assert a.client.get(f"/v1/runs/{r.json()['id']}", headers=a.h).json()["status"] == "succeeded"
    bad = a.client.get("/v1/agents", headers={"Authorization": "Bearer ptx_000000000000_nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthenticated"
