"""A queued run executed again after its worker died leaves a trace, and is charged once
per attempt.

A worker process is killed with SIGKILL in the middle of a run, after the model's first
response (the agent then writes its memory and waits for the second); the run goes back
to the queue when the dead worker's lease expires and another worker executes it again.
The run then shows both attempts, the requeue is in the tenant's audit log (and logged),
and the first attempt's tokens, recorded before the kill, are spent in the ledger and in
a usage record of their own. A worker that only stalled past its lease and then finishes
is charged the rest of its tokens, never what the reaper charged again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from patinox.agents import count_simulated_tokens
from patinox.api import create_app
from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import StorageError
from patinox.runtime import Runtime
from patinox.storage import utcnow
from patinox.tenancy import StorageModel, TenantContext
from tests.conftest import Deployment, auth

PROMPT = '/call memory_put {"key": "greeting", "value": "hello"}'
#: Each model response takes this long: the kill falls between the first and the second.
MODEL = "simulated:ttft_ms=1500,tpot_ms=0"
#: The first model response: the prompt in, the tool call (2 words) out.
FIRST_RESPONSE = {"input_tokens": count_simulated_tokens(PROMPT), "output_tokens": 2}


def tenant(runtime: Runtime, model: StorageModel) -> tuple[TenantContext, str, str]:
    """A tenant of ``model`` with a key and an agent that writes memory on a slow model."""
    t = runtime.tenants.create(TenantSpec(name="alpha", storage_model=model), actor="test")
    key = runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    ctx = runtime.keys.authenticate(key)
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model=MODEL, tools=["memory_put"]))
    return ctx, key, str(agent["id"])


def start_worker(deployment: Deployment, kek_url: str, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """``patinox worker`` as a process of its own, on the test's deployment."""
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


def wait_for_memory(runtime: Runtime, ctx: TenantContext, worker: subprocess.Popen[bytes], log: Path) -> None:
    """Until the run's tool wrote its memory: the first model response has arrived."""
    store = runtime.backend.tenant_store(ctx)
    deadline = time.monotonic() + 180  # a guard against a hang, not a measurement
    while store.memory_get("greeting") is None:
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            pytest.fail(f"the worker never reached the tool call; its output:\n{log.read_text()}")
        time.sleep(0.02)


def attempt_tokens(attempt: dict[str, Any]) -> int:
    return int(attempt["input_tokens"]) + int(attempt["output_tokens"])


@pytest.mark.parametrize(
    "deployment", ["sqlite-pool", "sqlite-silo", "pg-pool", "pg-bridge", "pg-silo"], indirect=True
)
def test_a_run_whose_worker_was_killed_shows_both_attempts_and_is_charged_for_both(
    runtime: Runtime, deployment: Deployment, kek_url: str, tmp_path: Path
) -> None:
    ctx, key, agent_id = tenant(runtime, StorageModel(deployment.storage_model))
    queued = asyncio.run(
        runtime.runs.start(ctx, agent_id, RunRequest(input=PROMPT, output_tokens=3, mode="async"))
    )
    reserved = runtime.budget.spent_today(ctx.tenant_id)[1]
    assert reserved > 0

    log = tmp_path / "worker.log"
    worker = start_worker(deployment, kek_url, tmp_path, log)
    dead = f"worker:{socket.gethostname()}:{worker.pid}"[:80]
    wait_for_memory(runtime, ctx, worker, log)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    store = runtime.backend.tenant_store(ctx)
    assert store.get_run(queued["id"])["status"] == "running"

    # The dead worker's lease expires; the reaper puts the run back and another worker
    # executes it from the start.
    with capture_logs() as logs:
        assert runtime.runs.reap_expired(now=utcnow() + timedelta(seconds=31)) == 1
    second = runtime.queue.claim("second-worker", lease_s=30)
    assert second is not None and second.run_id == queued["id"]
    finished = asyncio.run(runtime.runs.execute_claim(second))
    assert finished is not None and finished["status"] == "succeeded"

    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as client:
        run = client.get(f"/v1/runs/{queued['id']}", headers=auth(key)).json()
        audit = client.get("/v1/audit", headers=auth(key)).json()
        usage = client.get("/v1/usage", headers=auth(key)).json()
        listed = client.get("/v1/runs", headers=auth(key)).json()

    # The ledger spent both attempts' tokens: the first one's (its first model response,
    # complete before the kill) and the second's; no reservation is left.
    assert (
        usage["tokens_today"] == attempt_tokens(FIRST_RESPONSE) + run["input_tokens"] + run["output_tokens"]
    )
    assert usage["tokens_reserved"] == 0
    assert runtime.queue.held(ctx.tenant_id) == 0 and runtime.queue.depth(ctx.tenant_id) == 0

    # The run shows both attempts: the first cut short with what it had recorded, the
    # second run to the end.
    assert run["status"] == "succeeded" and run["attempts"] == 2
    first, then = run["attempt_history"]
    assert (first["attempt"], first["holder"], first["outcome"]) == (1, dead, "interrupted")
    assert first["ended_at"] is not None
    assert {k: first[k] for k in FIRST_RESPONSE} == FIRST_RESPONSE
    assert (then["attempt"], then["holder"], then["outcome"]) == (2, "second-worker", "succeeded")
    assert attempt_tokens(then) == run["input_tokens"] + run["output_tokens"]
    assert listed[0]["attempt_history"] == run["attempt_history"]

    # Each attempt has its usage record, together what the ledger spent.
    records = sorted((u for u in usage["records"] if u["run_id"] == queued["id"]), key=lambda u: u["attempt"])
    assert [u["attempt"] for u in records] == [1, 2]
    assert [attempt_tokens(u) for u in records] == [attempt_tokens(first), attempt_tokens(then)]

    # The requeue is in the tenant's audit log, naming the dead worker and its attempt.
    (requeue,) = [a for a in audit if a["action"] == "run.requeue"]
    assert requeue["target"] == queued["id"] and requeue["actor"] == "system"
    assert requeue["detail"]["holder"] == dead and requeue["detail"]["attempt"] == 1
    # ... and in the process's log.
    (warning,) = [e for e in logs if e["log_level"] == "warning" and e.get("run_id") == queued["id"]]
    assert (warning["tenant_id"], warning["holder"], warning["attempt"]) == (ctx.tenant_id, dead, 1)

    # The memory write ran twice, with the same key and value: one entry, as written once.
    assert store.memory_list() == ["greeting"] and store.memory_get("greeting") == "hello"


@pytest.mark.parametrize(
    "deployment", ["sqlite-pool", "sqlite-silo", "pg-pool", "pg-bridge", "pg-silo"], indirect=True
)
def test_a_stalled_worker_that_finishes_after_the_requeue_is_charged_only_the_rest(
    runtime: Runtime, deployment: Deployment
) -> None:
    """The first worker stalls past its lease after the model's first response; the
    reaper charges that response and puts the run back; a second worker executes it; then
    the first one comes back and finishes too. The ledger spends each attempt's tokens
    exactly once (the reaper's share of the first is not charged again by its worker),
    each attempt has one usage record counting all it used, and the first attempt, which
    did finish, says so."""
    ctx, _, agent_id = tenant(runtime, StorageModel(deployment.storage_model))
    queued = asyncio.run(
        runtime.runs.start(ctx, agent_id, RunRequest(input=PROMPT, output_tokens=3, mode="async"))
    )
    store = runtime.backend.tenant_store(ctx)

    async def interleave() -> tuple[Any, Any]:
        stalled = runtime.queue.claim("stalled-worker", lease_s=30)
        assert stalled is not None
        first = asyncio.create_task(runtime.runs.execute_claim(stalled))
        while store.memory_get("greeting") is None:  # the first response has arrived
            await asyncio.sleep(0.01)
        assert runtime.runs.reap_expired(now=utcnow() + timedelta(seconds=31)) == 1
        second = runtime.queue.claim("second-worker", lease_s=30)
        assert second is not None and second.run_id == queued["id"]
        return await asyncio.gather(first, runtime.runs.execute_claim(second))

    a, b = asyncio.run(interleave())
    assert a["status"] == b["status"] == "succeeded"
    used = a["input_tokens"] + a["output_tokens"]
    assert used == b["input_tokens"] + b["output_tokens"] > attempt_tokens(FIRST_RESPONSE)

    attempts = store.list_attempts([queued["id"]])[queued["id"]]
    assert [(x["attempt"], x["holder"], x["outcome"]) for x in attempts] == [
        (1, "stalled-worker", "succeeded"),
        (2, "second-worker", "succeeded"),
    ]
    assert [attempt_tokens(x) for x in attempts] == [used, used]
    records = sorted(
        (u for u in store.list_usage() if u["run_id"] == queued["id"]), key=lambda u: u["attempt"]
    )
    assert [(u["attempt"], attempt_tokens(u)) for u in records] == [(1, used), (2, used)]
    assert runtime.budget.spent_today(ctx.tenant_id) == (2 * used, 0)
    assert runtime.queue.held(ctx.tenant_id) == 0 and runtime.queue.depth(ctx.tenant_id) == 0
    assert [a["detail"]["attempt"] for a in store.list_audit() if a["action"] == "run.requeue"] == [1]


def test_a_synchronous_run_shows_its_one_attempt_and_a_queued_one_none_yet(
    runtime: Runtime, deployment: Deployment
) -> None:
    ctx, key, _ = tenant(runtime, StorageModel(deployment.storage_model))
    fast = runtime.agents.create(ctx, AgentSpec(name="fast", model="simulated:instant"))
    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as client:
        r = client.post(f"/v1/agents/{fast['id']}/runs", json={"input": "hi there"}, headers=auth(key))
        assert r.status_code == 200, r.text
        sync = r.json()
        got = client.get(f"/v1/runs/{sync['id']}", headers=auth(key)).json()
        r = client.post(
            f"/v1/agents/{fast['id']}/runs", json={"input": "later", "mode": "async"}, headers=auth(key)
        )
        assert r.status_code == 202, r.text
        queued = r.json()
    assert sync["attempts"] == got["attempts"] == 1
    (only,) = got["attempt_history"]
    assert (only["attempt"], only["holder"], only["outcome"]) == (1, None, "succeeded")
    assert attempt_tokens(only) == got["input_tokens"] + got["output_tokens"]
    (record,) = [u for u in runtime.backend.tenant_store(ctx).list_usage() if u["run_id"] == sync["id"]]
    assert record["attempt"] == 1
    assert (queued["attempts"], queued["attempt_history"]) == (0, [])


def test_a_worker_that_cannot_record_its_usage_stops_the_run_rather_than_run_unmetered(
    runtime: Runtime, deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound on what a dead worker leaves uncharged holds only while the usage of each
    model response is recorded before the run acts on it: when that write fails, the run
    stops there (failed, ``internal_error``), charged the response it had."""
    ctx, _, _ = tenant(runtime, StorageModel(deployment.storage_model))
    fast = runtime.agents.create(ctx, AgentSpec(name="fast", model="simulated:instant", tools=["memory_put"]))

    def refuse(*args: Any, **kwargs: Any) -> bool:
        raise StorageError("database error: OperationalError")

    monkeypatch.setattr(runtime.queue, "record_usage", refuse)
    queued = asyncio.run(
        runtime.runs.start(ctx, str(fast["id"]), RunRequest(input=PROMPT, output_tokens=3, mode="async"))
    )
    claim = runtime.queue.claim("worker", lease_s=30)
    assert claim is not None
    run = asyncio.run(runtime.runs.execute_claim(claim))
    assert run is not None and run["status"] == "failed" and run["error"]["reason"] == "internal_error"
    store = runtime.backend.tenant_store(ctx)
    assert store.memory_get("greeting") is None  # the tool the response asked for never ran
    (attempt,) = store.list_attempts([queued["id"]])[queued["id"]]
    assert attempt["outcome"] == "failed" and attempt_tokens(attempt) == attempt_tokens(FIRST_RESPONSE)
    assert runtime.budget.spent_today(ctx.tenant_id) == (attempt_tokens(FIRST_RESPONSE), 0)
