"""Suspend, resume, delete over the API; deletion checked in the database file itself."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.runtime import Runtime
from patinox.storage import open_backend
from patinox.storage.crypto import key_provider_from_url
from patinox.tenancy import IsolationLevel
from tests.conftest import Deployment, auth, count_tenant_rows, raw_db_bytes


def _total(counts: dict[str, int], table: str) -> int:
    """Rows in ``table`` wherever it lives (shared, bridge schema or silo)."""
    return sum(v for k, v in counts.items() if k.rsplit(".", 1)[-1].rsplit(":", 1)[-1] == table)


def test_suspend_refuses_every_tenant_call_and_keeps_data(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    a = make_tenant("alpha")
    agent = a.agent("x")
    op = auth(operator_key)
    r = client.post(f"/admin/tenants/{a.id}/suspend", headers=op)
    assert r.status_code == 200 and r.json()["state"] == "suspended"
    for method, path in (
        ("GET", "/v1/agents"),
        ("GET", f"/v1/agents/{agent}"),
        ("POST", f"/v1/agents/{agent}/runs"),
        ("GET", "/v1/memory"),
        ("GET", "/v1/me"),
    ):
        resp = client.request(method, path, json={"input": "x"} if method == "POST" else None, headers=a.h)
        assert resp.status_code == 403, path
        assert resp.json()["error"]["code"] == "tenant_suspended"
    # Suspending twice is an invalid transition.
    assert client.post(f"/admin/tenants/{a.id}/suspend", headers=op).status_code == 409
    assert client.post(f"/admin/tenants/{a.id}/resume", headers=op).json()["state"] == "active"
    assert client.get(f"/v1/agents/{agent}", headers=a.h).status_code == 200


def test_delete_removes_every_row_and_id_is_never_reused(
    client: TestClient, make_tenant: Any, operator_key: str, db_url: str, deployment: Deployment
) -> None:
    op = auth(operator_key)
    a = make_tenant("alpha")
    b = make_tenant("beta")
    agent = a.agent("x", instructions="alpha-instructions-marker")
    assert a.run(agent, "alpha-prompt-marker").status_code == 200
    client.put("/v1/memory/k", json={"value": "alpha-memory-marker"}, headers=a.h)
    b_agent = b.agent("y")
    assert b.run(b_agent).status_code == 200
    before = count_tenant_rows(deployment, a.id)
    for table in ("agents", "runs", "memory", "usage_records", "audit_log", "api_keys"):
        assert _total(before, table) > 0, table

    r = client.delete(f"/admin/tenants/{a.id}", headers=op)
    assert r.status_code == 200, r.text
    assert set(count_tenant_rows(deployment, a.id).values()) == {0}
    assert _total(count_tenant_rows(deployment, b.id), "agents") == 1  # the neighbour is untouched

    # Key refused, tenant gone, no resume of a deleted tenant.
    assert client.get("/v1/agents", headers=a.h).status_code == 401
    assert client.get(f"/admin/tenants/{a.id}", headers=op).status_code == 404
    assert client.post(f"/admin/tenants/{a.id}/resume", headers=op).status_code == 404
    assert client.delete(f"/admin/tenants/{a.id}", headers=op).status_code == 404

    # Same name again: a new id, and nothing old is visible.
    a2 = make_tenant("alpha")
    assert a2.id != a.id
    assert client.get("/v1/agents", headers=a2.h).json() == []
    assert client.get("/v1/memory", headers=a2.h).json() == []
    assert client.get("/v1/runs", headers=a2.h).json() == []
    # The deletion itself is audited at operator level and keeps the tombstone id.
    audit = client.get("/admin/audit", headers=op).json()
    assert any(x["action"] == "tenant.delete" and x["target"] == a.id for x in audit)
    listed = client.get("/admin/tenants?include_deleted=true", headers=op).json()
    assert any(t["id"] == a.id and t["state"] == "deleted" for t in listed)
    if deployment.postgres:
        return  # PostgreSQL: dead tuples are unreadable through SQL; files are checked on SQLite
    # Not in the file either (free pages are zeroed, the WAL is checkpointed).
    raw = raw_db_bytes(db_url)
    for marker in (b"alpha-instructions-marker", b"alpha-prompt-marker", b"alpha-memory-marker"):
        assert marker not in raw


def test_delete_is_resumable_after_a_crash(
    runtime: Any, make_tenant: Any, deployment: Deployment, client: TestClient, operator_key: str
) -> None:
    a = make_tenant("alpha")
    a.agent("x")
    # Crash after the state moved to "deleting" but before the purge.
    runtime.backend.update_tenant(a.id, {"state": "deleting"})
    assert client.get("/v1/agents", headers=a.h).status_code == 401
    assert _total(count_tenant_rows(deployment, a.id), "agents") == 1
    r = client.delete(f"/admin/tenants/{a.id}", headers=auth(operator_key))
    assert r.status_code == 200
    assert set(count_tenant_rows(deployment, a.id).values()) == {0}


@pytest.mark.only_deployments("pg-silo")
def test_delete_a_silo_tenant_while_another_process_has_connections_to_it(
    client: TestClient, make_tenant: Any, operator_key: str, deployment: Deployment, kek_url: str
) -> None:
    """Every other server and worker of the deployment keeps pooled connections, as the
    application role, to each silo database it has used. The owner role that drops the
    database may not terminate another role's sessions, so ``DROP DATABASE ... WITH (FORCE)``
    failed with InsufficientPrivilege and left the tenant ``deleting``."""
    a = make_tenant("alpha")
    assert client.put("/v1/memory/k", json={"value": "v"}, headers=a.h).status_code == 200
    other = open_backend(
        deployment.db_url, owner_url=deployment.owner_url, key_provider=key_provider_from_url(kek_url)
    )
    try:
        assert other.acting_on(a.id).memory_list() == ["k"]  # its silo engine keeps the connection
        r = client.delete(f"/admin/tenants/{a.id}", headers=auth(operator_key))
        assert r.status_code == 200, r.text
        assert set(count_tenant_rows(deployment, a.id).values()) == {0}  # the silo database too
    finally:
        other.close()


def test_update_plan_and_limits(client: TestClient, make_tenant: Any, operator_key: str) -> None:
    a = make_tenant("alpha")
    op = auth(operator_key)
    r = client.patch(
        f"/admin/tenants/{a.id}",
        json={"plan": "pro", "limits": {"max_concurrent_runs": 3}},
        headers=op,
    )
    assert r.status_code == 200, r.text
    me = client.get("/v1/me", headers=a.h).json()
    assert me["plan"] == "pro" and me["limits"]["max_concurrent_runs"] == 3
    assert client.patch(f"/admin/tenants/{a.id}", json={"plan": "gold"}, headers=op).status_code == 422
    assert client.get("/v1/me", headers=a.h).json()["plan"] == "pro"


@pytest.mark.parametrize("offered_levels", [frozenset({IsolationLevel.NAMESPACE, IsolationLevel.PROCESS})])
def test_unavailable_isolation_level_is_refused(
    client: TestClient, operator_key: str, runtime: Runtime, offered_levels: frozenset[IsolationLevel]
) -> None:
    """A level the deployment does not offer (here by its setting; on a host without
    bubblewrap, ``container`` and ``dedicated`` are not offered either) is refused."""
    missing = [level for level in IsolationLevel if level not in runtime.executors.levels]
    assert missing == [IsolationLevel.CONTAINER, IsolationLevel.DEDICATED]
    r = client.post(
        "/admin/tenants",
        json={"name": "iso", "isolation_level": missing[-1].value},
        headers=auth(operator_key),
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "isolation_unavailable"
    assert client.get("/admin/tenants", headers=auth(operator_key)).json() == []


def test_a_process_level_tenant_is_created_and_runs(client: TestClient, operator_key: str) -> None:
    r = client.post(
        "/admin/tenants", json={"name": "iso", "isolation_level": "process"}, headers=auth(operator_key)
    )
    assert r.status_code == 201, r.text
    assert r.json()["isolation_level"] == "process"
    key = client.post(f"/admin/tenants/{r.json()['id']}/keys", json={"name": "k"}, headers=auth(operator_key))
    h = auth(key.json()["key"])
    agent = client.post("/v1/agents", json={"name": "a", "model": "simulated:instant"}, headers=h).json()
    run = client.post(
        f"/v1/agents/{agent['id']}/runs", json={"input": "hello", "output_tokens": 3}, headers=h
    )
    assert run.status_code == 200, run.text
    assert run.json()["status"] == "succeeded" and run.json()["output_tokens"] == 3


def test_audit_records_every_tenant_action(client: TestClient, make_tenant: Any, operator_key: str) -> None:
    a = make_tenant("alpha")
    agent = a.agent("x")
    client.patch(f"/v1/agents/{agent}", json={"instructions": "new"}, headers=a.h)
    a.run(agent)
    client.delete(f"/v1/agents/{agent}", headers=a.h)
    actions = [x["action"] for x in client.get("/v1/audit", headers=a.h).json()]
    for expected in (
        "tenant.create",
        "key.create",
        "agent.create",
        "agent.update",
        "run.finish",
        "agent.delete",
    ):
        assert expected in actions
    rec = client.get("/v1/audit", headers=a.h).json()[-1]
    assert {"at", "actor", "tenant_id", "action", "target", "outcome"} <= set(rec)
    assert rec["actor"] == a.key_id and rec["tenant_id"] == a.id


def test_a_deleted_tenants_id_answers_like_an_unknown_one_and_its_storage_stays_gone(
    client: TestClient, make_tenant: Any, operator_key: str, deployment: Deployment, tmp_path: Any
) -> None:
    """``GET /admin/usage?tenant_id=<deleted bridge tenant>`` answered ``503 storage_error``
    (its schema is gone), so did ``/admin/audit`` for a deleted silo tenant, and on SQLite
    the request re-created an empty database file for it. Every operator route answers a
    deleted tenant's id exactly like an id never issued (``404 not_found``), its storage
    is never re-created, and the unfiltered views still answer."""
    op = auth(operator_key)
    a = make_tenant("alpha")
    agent = a.agent("x")
    assert a.run(agent).status_code == 200
    keep = make_tenant("beta")
    assert keep.run(keep.agent("y")).status_code == 200
    assert client.delete(f"/admin/tenants/{a.id}", headers=op).status_code == 200
    unknown = "tn_" + "0" * (len(a.id) - 3)
    for method, path in (
        ("GET", "/admin/tenants/{}"),
        ("GET", "/admin/tenants/{}/keys"),
        ("GET", "/admin/usage?tenant_id={}"),
        ("GET", "/admin/audit?tenant_id={}"),
        ("GET", "/admin/usage?tenant_id={}&since=2020-01-01T00:00:00Z"),
        ("POST", "/admin/tenants/{}/suspend"),
        ("POST", "/admin/tenants/{}/keys"),
        ("PATCH", "/admin/tenants/{}"),
        ("DELETE", "/admin/tenants/{}"),
    ):
        body = {"name": "k"} if path.endswith("/keys") and method == "POST" else None
        if method == "PATCH":
            body = {"plan": "pro"}
        deleted = client.request(method, path.format(a.id), json=body, headers=op)
        never = client.request(method, path.format(unknown), json=body, headers=op)
        assert (deleted.status_code, never.status_code) == (404, 404), (method, path, deleted.text)
        assert deleted.json()["error"]["code"] == never.json()["error"]["code"] == "not_found"
    assert set(count_tenant_rows(deployment, a.id).values()) == {0}  # no file, schema or database
    if not deployment.postgres:
        silo = tmp_path / "tenants"
        assert not any(p.name.startswith(a.id) for p in silo.iterdir()) if silo.exists() else True
    assert client.get("/admin/usage", headers=op).status_code == 200
    assert [u["tenant_id"] for u in client.get("/admin/usage", headers=op).json()] == [keep.id]
    assert client.get("/admin/audit", headers=op).status_code == 200
    assert client.get(f"/admin/usage?tenant_id={keep.id}", headers=op).json()[0]["runs"] == 1
