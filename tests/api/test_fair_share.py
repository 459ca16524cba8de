"""The deployment's own capacity is shared fairly: a tenant within its own limits but over
its share of the process waits (then ``503 overloaded``), while a light neighbour starts at
once; queued runs of a neighbour start even while long runs hold every slot."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.limits import AdmissionSettings
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend
from tests.conftest import Deployment, TenantHandle

pytestmark = pytest.mark.only_deployments("sqlite-pool", "pg-pool")

LONG = "simulated:ttft_ms=600000,tpot_ms=0"  # ten minutes: never done within a test


@contextmanager
def serving(
    deployment: Deployment, backend: SqlBackend, kek_url: str, admission: AdmissionSettings
) -> Iterator[tuple[TestClient, Runtime, str]]:
    settings = Settings(
        database_url=deployment.db_url, owner_url=deployment.owner_url, kek_url=kek_url, admission=admission
    )
    rt = Runtime.build(settings, backend=backend)
    op = rt.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret
    with TestClient(create_app(runtime=rt), raise_server_exceptions=False) as client:
        yield client, rt, op


def until(cond: Callable[[], bool], what: str, guard_s: float = 60.0) -> None:
    """Wait until ``cond()``; the guard only stops a hang, it is not what is tested."""
    deadline = time.monotonic() + guard_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {guard_s:.0f} s: {what}")
        time.sleep(0.02)


def runs(t: TenantHandle, status: str) -> int:
    listed = t.client.get("/v1/runs", params={"limit": 500}, headers=t.h).json()
    return sum(1 for r in listed if r["status"] == status)


def fixed(limit: int, **kw: Any) -> AdmissionSettings:
    return AdmissionSettings(initial_limit=limit, min_limit=limit, max_limit=limit, **kw)


def test_over_its_share_a_tenant_gets_503_overloaded_while_a_light_one_runs_at_once(
    deployment: Deployment, backend: SqlBackend, kek_url: str
) -> None:
    with serving(deployment, backend, kek_url, fixed(2, max_wait_s=0.5)) as (client, rt, op):
        heavy = TenantHandle(client, op, "heavy", "pro", {}, deployment.storage_model)
        light = TenantHandle(client, op, "light", "pro", {}, deployment.storage_model)
        slow = heavy.agent("slow", model="simulated:ttft_ms=3000,tpot_ms=0")
        quick = light.agent("quick")
        answers: list[int] = []
        threads = [
            threading.Thread(target=lambda: answers.append(heavy.run(slow, "x", output_tokens=1).status_code))
            for _ in range(2)
        ]
        for th in threads:
            th.start()
        until(lambda: runs(heavy, "running") == 2, "the heavy tenant's two runs")
        # The process is at its limit and the heavy tenant has all of it: a third run of
        # its own waits for its turn, then is refused, though none of its limits binds.
        r = heavy.run(slow, "x", output_tokens=1)
        assert r.status_code == 503, r.text
        body = r.json()["error"]
        assert body["code"] == "overloaded"
        assert body["details"]["tenant_id"] == heavy.id
        assert int(r.headers["Retry-After"]) >= 1
        assert runs(heavy, "running") == 2  # the refused run left nothing behind
        # The operator sees the process's share of its capacity; a tenant key does not.
        cap = client.get("/admin/capacity", headers={"Authorization": f"Bearer {op}"})
        assert cap.status_code == 200, cap.text
        state = cap.json()["fair_share"]
        assert (state["enabled"], state["limit"], state["running"], state["tenants"]) == (True, 2, 2, 1)
        assert state["refused"] == 1
        assert client.get("/admin/capacity", headers=heavy.h).status_code == 403
        # The light tenant is under its share: it runs now, beside the heavy runs.
        r = light.run(quick, "hello")
        assert r.status_code == 200, r.text
        assert all(th.is_alive() for th in threads)
        for th in threads:
            th.join()
        assert answers == [200, 200]
        assert rt.runs.admission is not None and rt.runs.admission.running == 0


def test_a_waiting_run_starts_when_a_slot_frees(
    deployment: Deployment, backend: SqlBackend, kek_url: str
) -> None:
    with serving(deployment, backend, kek_url, fixed(1, max_wait_s=30)) as (client, rt, op):
        a = TenantHandle(client, op, "alpha", "pro", {}, deployment.storage_model)
        agent = a.agent("slow", model="simulated:ttft_ms=300,tpot_ms=0")
        answers: list[int] = []
        first = threading.Thread(
            target=lambda: answers.append(a.run(agent, "x", output_tokens=1).status_code)
        )
        first.start()
        until(lambda: runs(a, "running") == 1, "the first run")
        assert a.run(agent, "x", output_tokens=1).status_code == 200  # waited, then ran
        first.join()
        assert answers == [200]
        assert rt.runs.admission is not None and rt.runs.admission.refused == 0


def test_a_neighbours_queued_run_starts_while_long_runs_hold_the_worker(
    deployment: Deployment, backend: SqlBackend, kek_url: str
) -> None:
    """The deployment's defaults: long queued runs of one tenant (more than the old fixed
    eight worker slots) never keep another tenant's run waiting behind them."""
    with serving(deployment, backend, kek_url, AdmissionSettings()) as (client, _rt, op):
        a = TenantHandle(client, op, "alpha", "pro", {"max_concurrent_runs": 64}, deployment.storage_model)
        b = TenantHandle(client, op, "beta", "pro", {}, deployment.storage_model)
        long, quick = a.agent("long", model=LONG), b.agent("quick")
        for _ in range(40):
            assert a.run(long, "x", output_tokens=1, mode="async").status_code == 202
        until(lambda: runs(a, "running") >= 8, "the long runs to hold the worker")
        r = b.run(quick, "hello", mode="async")
        assert r.status_code == 202
        run_id = r.json()["id"]
        until(
            lambda: client.get(f"/v1/runs/{run_id}", headers=b.h).json()["status"] == "succeeded",
            "the neighbour's run",
        )
        assert runs(a, "succeeded") == 0


def test_at_the_ceiling_a_neighbour_under_its_share_still_gets_a_worker_slot(
    deployment: Deployment, backend: SqlBackend, kek_url: str
) -> None:
    with serving(deployment, backend, kek_url, fixed(4)) as (client, _rt, op):
        a = TenantHandle(client, op, "alpha", "pro", {}, deployment.storage_model)
        b = TenantHandle(client, op, "beta", "pro", {}, deployment.storage_model)
        long, quick = a.agent("long", model=LONG), b.agent("quick")
        for _ in range(10):
            assert a.run(long, "x", output_tokens=1, mode="async").status_code == 202
        until(lambda: runs(a, "running") == 4, "the long runs to fill the limit")
        r = b.run(quick, "hello", mode="async")
        run_id = r.json()["id"]
        until(
            lambda: client.get(f"/v1/runs/{run_id}", headers=b.h).json()["status"] == "succeeded",
            "the neighbour's run",
        )
        # The long runs' tenant was at its share: it got no slot more meanwhile.
        assert runs(a, "running") == 4 and runs(a, "queued") == 6
