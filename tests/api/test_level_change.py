"""A tenant's isolation level changed live over ``PATCH /admin/tenants/{id}``: runs arriving
meanwhile wait (queued ones stay queued, synchronous ones answer 503 ``tenant_moving``),
runs in flight drain or are cancelled with a reason, none is lost, and it is audited."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.runtime import Runtime
from patinox.tenancy import IsolationLevel
from tests.conftest import TenantHandle, auth

pytestmark = pytest.mark.only_deployments("sqlite-pool", "pg-pool")

SLOW = "simulated:ttft_ms=3000,tpot_ms=0"  # outlasts the checks made while the change waits
ENDLESS = "simulated:ttft_ms=600000,tpot_ms=0"  # ten minutes: never done within a test


def until(cond: Callable[[], bool], what: str, guard_s: float = 60.0) -> None:
    """Wait until ``cond()``; the guard only stops a hang, it is not what is tested."""
    deadline = time.monotonic() + guard_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {guard_s:.0f} s: {what}")
        time.sleep(0.02)


def statuses(t: TenantHandle) -> dict[str, dict[str, Any]]:
    listed = t.client.get("/v1/runs", params={"limit": 500}, headers=t.h).json()
    return {r["id"]: r for r in listed}


def count(t: TenantHandle, status: str) -> int:
    return sum(1 for r in statuses(t).values() if r["status"] == status)


def require_process(runtime: Runtime) -> None:
    if IsolationLevel.PROCESS not in runtime.executors.levels:
        pytest.fail("this host cannot run the process isolation level (Linux with fork is needed; CI has it)")


def pools(runtime: Runtime) -> set[str]:
    executor = runtime.process_executor
    if executor is None or not executor.started:
        return set()
    return set(executor.supervisor.pools())


class Change:
    """A PATCH of the tenant's isolation level, sent from a thread (it returns once done)."""

    def __init__(self, client: TestClient, op: str, tenant_id: str, body: dict[str, Any]) -> None:
        self.response: Any = None
        self.thread = threading.Thread(
            target=lambda: setattr(
                self, "response", client.patch(f"/admin/tenants/{tenant_id}", json=body, headers=auth(op))
            )
        )
        self.thread.start()

    def join(self) -> Any:
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.response


def level_audits(client: TestClient, op: str, tenant_id: str) -> list[dict[str, Any]]:
    audit = client.get("/admin/audit", params={"tenant_id": tenant_id}, headers=auth(op)).json()
    return [a for a in audit if a["action"] == "tenant.isolation_level"]


def test_namespace_to_process_and_back_with_runs_in_flight_and_queued(
    client: TestClient, make_tenant: Any, operator_key: str, runtime: Runtime
) -> None:
    require_process(runtime)
    op = operator_key
    a = make_tenant("alpha", "pro", {"max_concurrent_runs": 3})
    b = make_tenant("beta", "pro")  # a bystander: never held
    slow, quick, endless = a.agent("slow", model=SLOW), a.agent("quick"), a.agent("endless", model=ENDLESS)
    other = b.agent("other")

    # --- namespace -> process: two synchronous runs and one claimed queued run in flight,
    # queued runs behind them (the cap of 3 keeps them in the queue).
    answers: list[Any] = []
    sync = [
        threading.Thread(target=lambda: answers.append(a.run(slow, "x", output_tokens=1))) for _ in range(2)
    ]
    for th in sync:
        th.start()
    in_flight_async = a.run(slow, "y", output_tokens=1, mode="async")
    assert in_flight_async.status_code == 202, in_flight_async.text
    until(lambda: count(a, "running") == 3, "three runs in flight")
    queued = [a.run(quick, f"q{i}", mode="async").json()["id"] for i in range(3)]

    change = Change(client, op, a.id, {"isolation_level": "process"})
    until(lambda: runtime.backend.get_tenant(a.id)["moving_to"] == "process", "the hold")
    # Meanwhile: a synchronous run waits outside (503 with Retry-After), an asynchronous
    # one is queued; reads and the neighbour go on.
    r = a.run(quick, "now")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "tenant_moving"
    assert int(r.headers["Retry-After"]) >= 1
    late = a.run(quick, "later", mode="async")
    assert late.status_code == 202, late.text
    queued.append(late.json()["id"])
    assert client.put("/v1/memory/k", json={"value": "v"}, headers=a.h).status_code == 503
    assert client.get("/v1/agents", headers=a.h).status_code == 200
    assert b.run(other, "hi").status_code == 200
    for run_id in queued:
        assert statuses(a)[run_id]["status"] == "queued"

    r = change.join()
    assert r.status_code == 200, r.text
    assert r.json()["isolation_level"] == "process"
    assert runtime.backend.get_tenant(a.id)["moving_to"] is None
    for th in sync:
        th.join()
    assert [x.status_code for x in answers] == [200, 200]  # drained, not cancelled
    until(
        lambda: all(statuses(a)[i]["status"] == "succeeded" for i in [*queued, in_flight_async.json()["id"]]),
        "the queued runs, at the new level",
    )
    assert a.run(quick, "at process").status_code == 200
    assert a.id in pools(runtime)  # the process executor took the tenant
    (up,) = level_audits(client, op, a.id)
    assert up["outcome"] == "ok"
    assert up["detail"]["old_level"] == "namespace" and up["detail"]["new_level"] == "process"
    assert up["detail"]["runs_drained"] == 3 and up["detail"]["runs_cancelled"] == 0

    # --- process -> namespace with a run that outlives the drain: cancelled with a reason,
    # settled; a queued run waits and then runs at namespace.
    stuck: list[Any] = []
    th = threading.Thread(target=lambda: stuck.append(a.run(endless, "z", output_tokens=1)))
    th.start()
    stuck_async = a.run(endless, "za", output_tokens=1, mode="async").json()["id"]
    until(lambda: count(a, "running") == 2, "two endless runs in flight")
    change = Change(client, op, a.id, {"isolation_level": "namespace", "drain_timeout_s": 1.0})
    until(lambda: runtime.backend.get_tenant(a.id)["moving_to"] == "namespace", "the hold")
    waiting = a.run(quick, "after", mode="async").json()["id"]
    r = change.join()
    assert r.status_code == 200, r.text
    assert r.json()["isolation_level"] == "namespace"
    th.join(30)
    (failed,) = stuck
    assert failed.status_code >= 400, failed.text
    assert failed.json()["error"]["details"]["reason"] == "isolation_level_change"
    runs = statuses(a)
    assert runs[stuck_async]["status"] == "failed"
    assert runs[stuck_async]["error"]["reason"] == "isolation_level_change"
    until(lambda: statuses(a)[waiting]["status"] == "succeeded", "the run queued during the change")
    assert a.id not in pools(runtime)  # the process executor released the tenant
    assert count(a, "running") == 0 and count(a, "queued") == 0  # none stuck
    downs = [x for x in level_audits(client, op, a.id) if x["detail"]["new_level"] == "namespace"]
    assert len(downs) == 1, downs
    assert downs[0]["detail"]["old_level"] == "process"
    assert downs[0]["detail"]["runs_cancelled"] == 2
    assert downs[0]["detail"]["drain_timeout_s"] == 1.0
    # Tokens settled: nothing held, nothing reserved.
    assert not runtime.queue.held(a.id)


@pytest.mark.parametrize("offered_levels", [frozenset({IsolationLevel.NAMESPACE, IsolationLevel.PROCESS})])
def test_a_level_this_host_cannot_enforce_is_refused(
    client: TestClient,
    make_tenant: Any,
    operator_key: str,
    runtime: Runtime,
    offered_levels: frozenset[IsolationLevel],
) -> None:
    missing = [lvl for lvl in IsolationLevel if lvl not in runtime.executors.levels]
    assert missing == [IsolationLevel.CONTAINER, IsolationLevel.DEDICATED]
    a = make_tenant("alpha")
    r = client.patch(
        f"/admin/tenants/{a.id}", json={"isolation_level": missing[-1].value}, headers=auth(operator_key)
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "isolation_unavailable"
    row = runtime.backend.get_tenant(a.id)
    assert (row["isolation_level"], row["moving_to"]) == ("namespace", None)


def test_lowering_below_what_agents_need_is_refused_naming_them(
    client: TestClient, make_tenant: Any, operator_key: str, runtime: Runtime
) -> None:
    a = make_tenant("alpha")
    # The tenant as a container-level one would be (whatever this host offers).
    runtime.backend.update_tenant(a.id, {"isolation_level": "container"})
    a.agent("coder", tools=["python"])
    a.agent("zcoder", tools=["calculator", "python"])
    a.agent("plain")
    r = client.patch(
        f"/admin/tenants/{a.id}", json={"isolation_level": "namespace"}, headers=auth(operator_key)
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "isolation_required"
    assert err["details"]["agents"] == ["coder", "zcoder"]
    assert err["details"]["required"] == "container" and err["details"]["tool"] == "python"
    assert "coder" in err["message"]
    row = runtime.backend.get_tenant(a.id)
    assert (row["isolation_level"], row["moving_to"]) == ("container", None)
    assert level_audits(client, operator_key, a.id) == []


def test_bad_level_changes_are_refused(client: TestClient, make_tenant: Any, operator_key: str) -> None:
    a = make_tenant("alpha")
    h = auth(operator_key)
    r = client.patch(f"/admin/tenants/{a.id}", json={"drain_timeout_s": 5}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    r = client.patch(f"/admin/tenants/{a.id}", json={"isolation_level": "bunker"}, headers=h)
    assert r.status_code == 422, r.text
    r = client.patch(f"/admin/tenants/{a.id}", json={"isolation_level": "namespace"}, headers=h)
    assert r.status_code == 200 and r.json()["isolation_level"] == "namespace"  # nothing to do
    assert (
        client.patch(f"/admin/tenants/{a.id}", json={"isolation_level": "process"}, headers=a.h).status_code
        == 403
    )
