"""Keys: wrong, revoked, cross-tenant and missing keys; admin routes refuse tenant keys."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import auth, raw_db_bytes


def test_missing_malformed_wrong_keys(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    bodies = []
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        auth("nope"),
        auth(a.key[:-2] + "xx"),
        auth("ptx_aaaaaaaaaaaa_" + "x" * 43),
    ):
        r = client.get("/v1/agents", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "unauthenticated"
        bodies.append(r.json()["error"]["code"])
    assert len(set(bodies)) == 1


def test_revoked_key_refused(client: TestClient, make_tenant: Any, operator_key: str) -> None:
    a = make_tenant("alpha")
    assert client.get("/v1/agents", headers=a.h).status_code == 200
    r = client.delete(f"/admin/tenants/{a.id}/keys/{a.key_id}", headers=auth(operator_key))
    assert r.status_code == 200 and r.json()["revoked_at"]
    assert client.get("/v1/agents", headers=a.h).status_code == 401


def test_key_of_one_tenant_cannot_be_revoked_via_another(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    a = make_tenant("alpha")
    b = make_tenant("beta")
    r = client.delete(f"/admin/tenants/{b.id}/keys/{a.key_id}", headers=auth(operator_key))
    assert r.status_code == 404
    assert client.get("/v1/agents", headers=a.h).status_code == 200


def test_admin_routes_refuse_tenant_keys(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    for method, path in (
        ("GET", "/admin/tenants"),
        ("POST", "/admin/tenants"),
        ("GET", f"/admin/tenants/{a.id}"),
        ("GET", "/admin/usage"),
    ):
        r = client.request(method, path, json={"name": "x"} if method == "POST" else None, headers=a.h)
        assert r.status_code == 403, path
        assert r.json()["error"]["code"] == "forbidden"


def test_tenant_routes_refuse_operator_keys(client: TestClient, operator_key: str) -> None:
    r = client.get("/v1/agents", headers=auth(operator_key))
    assert r.status_code == 403


def test_scopes_enforced(client: TestClient, make_tenant: Any, operator_key: str) -> None:
    a = make_tenant("alpha")
    agent = a.agent("x")
    r = client.post(
        f"/admin/tenants/{a.id}/keys",
        json={"name": "ro", "scopes": ["read"]},
        headers=auth(operator_key),
    )
    ro = auth(r.json()["key"])
    assert client.get("/v1/agents", headers=ro).status_code == 200
    r = client.post("/v1/agents", json={"name": "y"}, headers=ro)
    assert r.status_code == 403 and r.json()["error"]["details"]["scope"] == "agents:write"
    assert client.post(f"/v1/agents/{agent}/runs", json={"input": "x"}, headers=ro).status_code == 403
    assert client.put("/v1/memory/k", json={"value": "v"}, headers=ro).status_code == 403


def test_tenant_keys_cannot_get_admin_scope(client: TestClient, make_tenant: Any, operator_key: str) -> None:
    a = make_tenant("alpha")
    r = client.post(
        f"/admin/tenants/{a.id}/keys",
        json={"name": "x", "scopes": ["admin"]},
        headers=auth(operator_key),
    )
    assert r.status_code == 422


@pytest.mark.only_deployments("sqlite-pool", "sqlite-silo")
def test_key_secret_not_stored_in_clear(client: TestClient, make_tenant: Any, db_url: str) -> None:
    a = make_tenant("alpha")
    raw = raw_db_bytes(db_url)
    secret_part = a.key.split("_", 2)[2]
    assert secret_part.encode() not in raw
    listed = client.get(f"/admin/tenants/{a.id}/keys", headers=auth(a.key))
    assert listed.status_code == 403
