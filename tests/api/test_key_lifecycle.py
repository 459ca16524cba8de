"""API keys, complete: expiry (refused once past, also from the authentication cache),
rotation with an overlap, last use recorded, and a tenant managing its own keys through
``/v1/keys`` without ever creating, rotating or revoking a key with more scopes than the
key doing it."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import auth

pytestmark = pytest.mark.only_deployments("sqlite-pool", "pg-pool")


def _key(client: TestClient, operator_key: str, tenant_id: str, **body: Any) -> dict[str, Any]:
    r = client.post(
        f"/admin/tenants/{tenant_id}/keys", json={"name": "k", **body}, headers=auth(operator_key)
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def _works(client: TestClient, key: str) -> int:
    return client.get("/v1/me", headers=auth(key)).status_code


def test_a_key_stops_working_when_it_expires(client: TestClient, operator_key: str, make_tenant: Any) -> None:
    t = make_tenant("acme")
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    r = client.post(
        f"/admin/tenants/{t.id}/keys", json={"name": "k", "expires_at": past}, headers=auth(operator_key)
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    naive = datetime.now(UTC).replace(tzinfo=None).isoformat()
    r = client.post(
        f"/admin/tenants/{t.id}/keys", json={"name": "k", "expires_at": naive}, headers=auth(operator_key)
    )
    assert r.status_code == 422
    ends = datetime.now(UTC) + timedelta(seconds=1.5)
    key = _key(client, operator_key, t.id, expires_at=ends.isoformat())
    assert key["expires_at"] is not None
    assert _works(client, key["key"]) == 200  # and now it is in the authentication cache
    while datetime.now(UTC) <= ends:
        time.sleep(0.05)
    assert _works(client, key["key"]) == 401
    assert _works(client, t.key) == 200  # the tenant's other key is untouched


def test_rotation_keeps_the_old_key_for_the_overlap_only(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    t = make_tenant("acme")
    old = _key(client, operator_key, t.id, scopes=["read"])
    assert _works(client, old["key"]) == 200
    r = client.post(
        f"/admin/tenants/{t.id}/keys/{old['id']}/rotate", json={"overlap_s": 3600}, headers=auth(operator_key)
    )
    assert r.status_code == 201, r.text
    new = r.json()
    assert (new["name"], new["scopes"]) == (old["name"], ["read"]) and new["id"] != old["id"]
    assert _works(client, old["key"]) == 200 and _works(client, new["key"]) == 200
    listed = {
        k["id"]: k for k in client.get(f"/admin/tenants/{t.id}/keys", headers=auth(operator_key)).json()
    }
    assert "key" not in listed[old["id"]] and "secret_hash" not in listed[old["id"]]
    ends = datetime.fromisoformat(listed[old["id"]]["expires_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=59) < ends - datetime.now(UTC) <= timedelta(hours=1)
    # Rotating the new one with no overlap stops it at once (the cache forgets it too).
    r = client.post(
        f"/admin/tenants/{t.id}/keys/{new['id']}/rotate", json={"overlap_s": 0}, headers=auth(operator_key)
    )
    assert r.status_code == 201
    assert _works(client, new["key"]) == 401 and _works(client, r.json()["key"]) == 200
    # A revoked or unknown key cannot be rotated; overlaps are bounded.
    missing = client.post(f"/admin/tenants/{t.id}/keys/key_nope/rotate", json={}, headers=auth(operator_key))
    assert missing.status_code == 404
    long = client.post(
        f"/admin/tenants/{t.id}/keys/{old['id']}/rotate",
        json={"overlap_s": 10**9},
        headers=auth(operator_key),
    )
    assert long.status_code == 422
    actions = [a["action"] for a in client.get("/v1/audit", headers=t.h).json()]
    assert actions.count("key.rotate") == 2


def test_last_use_is_recorded(client: TestClient, operator_key: str, make_tenant: Any) -> None:
    t = make_tenant("acme")
    idle = _key(client, operator_key, t.id)
    used = _key(client, operator_key, t.id)
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert _works(client, used["key"]) == 200
    listed = {
        k["id"]: k for k in client.get(f"/admin/tenants/{t.id}/keys", headers=auth(operator_key)).json()
    }
    assert listed[idle["id"]]["last_used_at"] is None
    seen = datetime.fromisoformat(listed[used["id"]]["last_used_at"].replace("Z", "+00:00"))
    assert seen >= before


def test_a_tenant_manages_its_own_keys_within_its_scopes(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    a = make_tenant("alpha")
    b = make_tenant("beta")
    assert client.get("/v1/keys", headers=a.h).status_code == 403  # default scopes: no keys:write
    admin = _key(client, operator_key, a.id, scopes=["keys:write", "read", "runs:write"])
    h = auth(admin["key"])
    made = client.post("/v1/keys", json={"name": "ci", "scopes": ["read"]}, headers=h)
    assert made.status_code == 201, made.text
    assert made.json()["scopes"] == ["read"] and _works(client, made.json()["key"]) == 200
    default = client.post("/v1/keys", json={"name": "d"}, headers=h).json()
    assert default["scopes"] == ["read", "runs:write"]  # the defaults it holds
    beyond = client.post("/v1/keys", json={"name": "x", "scopes": ["agents:write"]}, headers=h)
    assert beyond.status_code == 403 and beyond.json()["error"]["code"] == "forbidden"
    admin_scope = client.post("/v1/keys", json={"name": "x", "scopes": ["admin"]}, headers=h)
    assert admin_scope.status_code == 422
    ids = {k["id"] for k in client.get("/v1/keys", headers=h).json()}
    assert {admin["id"], made.json()["id"], default["id"], a.key_id} <= ids
    assert b.key_id not in ids
    # Another tenant's key answers like a missing one; a stronger key is not its to touch.
    assert client.delete(f"/v1/keys/{b.key_id}", headers=h).status_code == 404
    assert client.post(f"/v1/keys/{b.key_id}/rotate", json={}, headers=h).status_code == 404
    assert client.delete(f"/v1/keys/{a.key_id}", headers=h).status_code == 403  # holds agents:write
    assert client.post(f"/v1/keys/{a.key_id}/rotate", json={}, headers=h).status_code == 403
    assert _works(client, a.key) == 200 and _works(client, b.key) == 200
    # Its own weaker key: rotated, then revoked.
    rotated = client.post(f"/v1/keys/{made.json()['id']}/rotate", json={"overlap_s": 0}, headers=h)
    assert rotated.status_code == 201 and _works(client, made.json()["key"]) == 401
    gone = client.delete(f"/v1/keys/{rotated.json()['id']}", headers=h)
    assert gone.status_code == 200 and gone.json()["revoked_at"] is not None
    assert _works(client, rotated.json()["key"]) == 401
