"""Secret routes: write-only (``PUT``/``GET``/``DELETE /v1/secrets``, scope ``secrets:write``),
per tenant (a foreign tenant's secret answers as a missing one), audited, and a planted
value never appears in any response, error body, audit record or log line."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.runtime import Runtime
from tests.conftest import Deployment, auth

CANARY = "sk-canary-api-5e1d2c3b4a"


def secrets_key(client: TestClient, operator_key: str, tenant_id: str) -> dict[str, str]:
    r = client.post(
        f"/admin/tenants/{tenant_id}/keys",
        json={"name": "admin", "scopes": ["read", "secrets:write", "agents:write", "runs:write"]},
        headers=auth(operator_key),
    )
    assert r.status_code == 201, r.text
    return auth(r.json()["key"])


@pytest.mark.only_deployments("sqlite-pool", "pg-bridge")
def test_write_only_per_tenant_and_the_value_never_comes_back(
    client: TestClient,
    operator_key: str,
    make_tenant: Any,
    runtime: Runtime,
    deployment: Deployment,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = make_tenant("alpha"), make_tenant("beta")
    ha, hb = secrets_key(client, operator_key, a.id), secrets_key(client, operator_key, b.id)
    seen: list[str] = []

    def call(method: str, path: str, headers: dict[str, str], **kw: Any) -> Any:
        r = client.request(method, path, headers=headers, **kw)
        seen.append(r.text + repr(dict(r.headers)))
        return r

    r = call("PUT", "/v1/secrets/provider:openai", ha, json={"value": CANARY})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "provider:openai" and r.json()["version"] == 1 and "value" not in r.json()
    r = call("PUT", "/v1/secrets/provider:openai", ha, json={"value": CANARY + "-rotated"})
    assert r.status_code == 200 and r.json()["version"] == 2
    listed = call("GET", "/v1/secrets", ha).json()
    assert [(s["name"], s["version"]) for s in listed] == [("provider:openai", 2)]
    # The default key scopes do not include secrets:write.
    assert call("GET", "/v1/secrets", a.h).status_code == 403
    assert call("PUT", "/v1/secrets/x", a.h, json={"value": CANARY}).status_code == 403
    # Another tenant sees nothing and its delete answers like a missing secret.
    assert call("GET", "/v1/secrets", hb).json() == []
    missing = call("DELETE", "/v1/secrets/never-set", hb)
    foreign = call("DELETE", "/v1/secrets/provider:openai", hb)
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    # Bad input is refused without echoing the value.
    for body in (
        {"value": CANARY, "extra": CANARY},
        {"value": CANARY * 5000},
        {"value": ""},
        {"value": CANARY + "\u0000"},
        {"nope": CANARY},
    ):
        r = call("PUT", "/v1/secrets/token", ha, json=body)
        assert r.status_code in (413, 422), r.text  # over the body limit: 413
    r = call("PUT", "/v1/secrets/bad%20name", ha, json={"value": CANARY})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    # The operator's routes: the same, for any tenant.
    r = call("PUT", f"/admin/tenants/{b.id}/secrets/token", auth(operator_key), json={"value": CANARY})
    assert r.status_code == 201
    assert [s["name"] for s in call("GET", f"/admin/tenants/{b.id}/secrets", auth(operator_key)).json()] == [
        "token"
    ]
    assert call("DELETE", f"/admin/tenants/{b.id}/secrets/token", auth(operator_key)).status_code == 204
    assert call("DELETE", "/v1/secrets/provider:openai", ha).status_code == 204
    assert call("GET", "/v1/secrets", ha).json() == []

    audit = call("GET", "/v1/audit", ha, params={"limit": 500}).json()
    actions = [(e["action"], e["target"]) for e in audit]
    assert ("secret.set", "provider:openai") in actions
    assert ("secret.rotate", "provider:openai") in actions
    assert ("secret.delete", "provider:openai") in actions
    ops = call("GET", "/admin/audit", auth(operator_key), params={"tenant_id": b.id, "limit": 500}).json()
    assert ("secret.set", "token") in [(e["action"], e["target"]) for e in ops]
    out = capsys.readouterr()
    everything = "\n".join([*seen, caplog.text, out.out, out.err])
    assert CANARY not in everything
