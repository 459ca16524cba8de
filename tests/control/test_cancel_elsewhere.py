"""A run cancelled by its tenant while another process runs it stops there, and is settled
like any cancelled run: charged what it used, its reservation given back, its attempt
ended ``cancelled``.

The cancel is a mark on the run's queue entry (``run_queue.cancel_requested_at``) that the
process running it reads once a second (``RunService.watch_tenants``): a durable request
in the shared database every process already reads, on SQLite and PostgreSQL alike.
Before, nothing could reach a run in another process: it ran to its end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import NotFound, RunFinished
from patinox.runtime import Runtime
from patinox.tenancy import StorageModel, TenantContext
from tests.conftest import Deployment

PROMPT = '/call memory_put {"key": "step", "value": "one"}'
#: A tool call at once, then 200 output tokens at 0.1 s each: still running when cancelled.
MODEL = "simulated:ttft_ms=0,tpot_ms=100"


def tenant(runtime: Runtime, name: str, model: StorageModel) -> tuple[TenantContext, str]:
    t = runtime.tenants.create(TenantSpec(name=name, storage_model=model), actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model=MODEL, tools=["memory_put"]))
    return ctx, str(agent["id"])


def start_worker(deployment: Deployment, kek_url: str, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PATINOX_DATABASE_URL": deployment.db_url, "PATINOX_KEK_URL": kek_url}
    if deployment.owner_url:
        env["PATINOX_OWNER_URL"] = deployment.owner_url
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "patinox", "worker", "--concurrency", "1", "--data-dir", str(data_dir)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def until(cond: object, what: str, worker: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120  # a guard against a hang, not a measurement
    while not cond():  # type: ignore[operator]
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            pytest.fail(f"never: {what}; the worker's output:\n{log.read_text()}")
        time.sleep(0.02)


@pytest.mark.parametrize(
    "deployment", ["sqlite-pool", "sqlite-silo", "pg-pool", "pg-bridge", "pg-silo"], indirect=True
)
def test_a_run_in_another_worker_process_is_cancelled_there_and_settled(
    runtime: Runtime, deployment: Deployment, kek_url: str, tmp_path: Path
) -> None:
    ctx, agent_id = tenant(runtime, "alpha", StorageModel(deployment.storage_model))
    other, _ = tenant(runtime, "beta", StorageModel(deployment.storage_model))
    queued = asyncio.run(
        runtime.runs.start(ctx, agent_id, RunRequest(input=PROMPT, output_tokens=200, mode="async"))
    )
    store = runtime.backend.tenant_store(ctx)
    log = tmp_path / "worker.log"
    worker = start_worker(deployment, kek_url, tmp_path, log)
    try:
        until(lambda: store.memory_get("step") is not None, "the run's tool call", worker, log)
        # Another tenant cannot cancel it, and learns nothing: as for a missing run.
        with pytest.raises(NotFound) as foreign:
            asyncio.run(runtime.runs.cancel(other, queued["id"]))
        with pytest.raises(NotFound) as missing:
            asyncio.run(runtime.runs.cancel(other, "run_doesnotexist00000000"))
        assert type(foreign.value) is type(missing.value) and foreign.value.code == missing.value.code
        assert store.get_run(queued["id"])["status"] == "running"

        # Not running in this process: the request goes to the worker through the queue.
        run, _ = asyncio.run(runtime.runs.cancel(ctx, queued["id"]))
        until(
            lambda: store.get_run(queued["id"])["status"] == "failed",
            "the worker settled the run",
            worker,
            log,
        )
        assert worker.poll() is None  # the worker stopped the run, not itself
    finally:
        worker.terminate()
        worker.wait()

    run = store.get_run(queued["id"])
    assert run["error"]["reason"] == "cancelled"
    # Charged what it used: the tool call's response and part of the reply, not the 200 tokens.
    assert 2 <= run["output_tokens"] < 200 and run["input_tokens"] > 0
    used = run["input_tokens"] + run["output_tokens"]
    assert runtime.budget.spent_today(ctx.tenant_id) == (used, 0)
    assert runtime.queue.held(ctx.tenant_id) == runtime.queue.depth(ctx.tenant_id) == 0
    (attempt,) = store.list_attempts([queued["id"]])[queued["id"]]
    assert attempt["outcome"] == "cancelled"
    audit = store.list_audit()
    assert [a["target"] for a in audit if a["action"] == "run.cancel"] == [queued["id"]]
    with pytest.raises(RunFinished):
        asyncio.run(runtime.runs.cancel(ctx, queued["id"]))
