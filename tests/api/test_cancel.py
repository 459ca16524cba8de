"""``POST /v1/runs/{id}/cancel``: a queued run leaves the queue with its reservation given
back, a running run is stopped and charged what it used, a finished run answers 409
``run_finished``, and another tenant's run answers exactly like a missing one.

Before, the route did not exist (404 for every run) and a queued run could only wait its
turn, holding its worst-case tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.runtime import Runtime
from tests.conftest import TenantHandle

#: 40 output tokens at 0.25 s each: a run that is still running when it is cancelled.
SLOW = "simulated:ttft_ms=0,tpot_ms=250"
PROMPT = '/call memory_put {"key": "step", "value": "one"}'


def until(cond: Callable[[], bool], what: str, guard_s: float = 60.0) -> None:
    """Poll ``cond``; the guard catches a hang, it measures nothing."""
    deadline = time.monotonic() + guard_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        time.sleep(0.02)


def status(client: TestClient, t: TenantHandle, run_id: str) -> Any:
    return client.get(f"/v1/runs/{run_id}", headers=t.h).json()["status"]


def test_queued_and_running_runs_are_cancelled_and_settled(
    client: TestClient, make_tenant: Any, runtime: Runtime
) -> None:
    a = make_tenant("alpha", "pro", {"max_concurrent_runs": 1})
    agent = a.agent(model=SLOW, tools=["memory_put"])
    first = a.run(agent, PROMPT, mode="async", output_tokens=40).json()
    until(lambda: status(client, a, first["id"]) == "running", "the first run started")
    # The tenant's one slot is taken: the second run waits in the queue.
    second = a.run(agent, "wait for me", mode="async", output_tokens=40).json()
    assert second["status"] == "queued"
    reserved_both = runtime.budget.spent_today(a.id)[1]

    r = client.post(f"/v1/runs/{second['id']}/cancel", headers=a.h)
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert cancelled["status"] == "failed" and cancelled["error"]["reason"] == "cancelled"
    assert cancelled["input_tokens"] == cancelled["output_tokens"] == 0
    assert runtime.queue.depth(a.id) == 0
    # Its reservation is given back; the running run's is still held.
    spent, reserved = runtime.budget.spent_today(a.id)
    assert spent == 0 and 0 < reserved < reserved_both

    # The running one: stopped here after its tool call, charged the response it used.
    until(lambda: client.get("/v1/memory/step", headers=a.h).status_code == 200, "the tool ran")
    r = client.post(f"/v1/runs/{first['id']}/cancel", headers=a.h)
    assert r.status_code == 200, r.text
    stopped = r.json()
    assert stopped["status"] == "failed" and stopped["error"]["reason"] == "cancelled"
    assert stopped["output_tokens"] >= 2 and stopped["input_tokens"] > 0
    assert stopped["attempt_history"][-1]["outcome"] == "cancelled"
    used = stopped["input_tokens"] + stopped["output_tokens"]
    assert runtime.budget.spent_today(a.id) == (used, 0)
    assert runtime.queue.held(a.id) == 0

    # Both cancels are audited, by the key that asked.
    audit = client.get("/v1/audit", headers=a.h).json()
    cancels = [x for x in audit if x["action"] == "run.cancel"]
    assert [(x["target"], x["actor"]) for x in cancels] == [(second["id"], a.key_id), (first["id"], a.key_id)]

    # A finished run: 409 with a stable code, nothing changed.
    again = client.post(f"/v1/runs/{first['id']}/cancel", headers=a.h)
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_finished"
    done = a.run(agent, "quick", output_tokens=1)  # sync, finished
    r = client.post(f"/v1/runs/{done.json()['id']}/cancel", headers=a.h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "run_finished"


def test_another_tenants_run_cannot_be_cancelled_and_looks_missing(
    client: TestClient, make_tenant: Any
) -> None:
    a = make_tenant("alpha", "pro", {"max_concurrent_runs": 1})
    b = make_tenant("beta")
    agent = a.agent(model=SLOW)
    blocker = a.run(agent, "hold the slot", mode="async", output_tokens=40).json()
    queued = a.run(agent, "queued", mode="async", output_tokens=40).json()

    foreign = client.post(f"/v1/runs/{queued['id']}/cancel", headers=b.h)
    missing = client.post("/v1/runs/run_doesnotexist00000000/cancel", headers=b.h)
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    assert status(client, a, queued["id"]) == "queued"
    for run in (queued, blocker):
        assert client.post(f"/v1/runs/{run['id']}/cancel", headers=a.h).status_code == 200


def test_cancel_needs_the_runs_write_scope(client: TestClient, make_tenant: Any, operator_key: str) -> None:
    a = make_tenant("alpha", "pro", {"max_concurrent_runs": 1})
    agent = a.agent(model=SLOW)
    a.run(agent, "hold the slot", mode="async", output_tokens=40)
    queued = a.run(agent, "queued", mode="async", output_tokens=40).json()
    r = client.post(
        f"/admin/tenants/{a.id}/keys",
        json={"name": "reader", "scopes": ["read"]},
        headers={"Authorization": f"Bearer {operator_key}"},
    )
    reader = {"Authorization": f"Bearer {r.json()['key']}"}
    refused = client.post(f"/v1/runs/{queued['id']}/cancel", headers=reader)
    assert refused.status_code == 403
    assert status(client, a, queued["id"]) == "queued"
