"""``GET /v1/config`` and ``GET /admin/tenants/{id}/config``: each setting's effective value
and layer, the caller's tenant only, following changes to plan and overrides."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import auth


def test_a_tenant_sees_its_own_settings_with_their_layers(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    a = make_tenant("alpha", plan="pro", limits={"tokens_per_day": 777})
    b = make_tenant("beta")
    got = client.get("/v1/config", headers=a.h)
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["tenant_id"], body["plan"]) == (a.id, "pro")
    assert body["limits"]["tokens_per_day"] == {
        "value": 777,
        "source": "tenant",
        "description": "model tokens (in + out) per UTC day",
    }
    assert body["limits"]["max_concurrent_runs"]["source"] == "plan"
    assert body["limits"]["max_concurrent_runs"]["value"] == 32
    # The same key only ever answers for its own tenant.
    assert client.get("/v1/config", headers=b.h).json()["tenant_id"] == b.id
    # The operator sees any tenant's; a tenant key cannot use the operator route.
    op = client.get(f"/admin/tenants/{a.id}/config", headers=auth(operator_key))
    assert op.status_code == 200 and op.json() == body
    assert client.get(f"/admin/tenants/{a.id}/config", headers=b.h).status_code in (401, 403)
    assert client.get("/admin/tenants/tn_nope/config", headers=auth(operator_key)).status_code == 404
    assert client.get("/v1/config").status_code == 401


def test_the_layers_follow_plan_and_override_changes(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    a = make_tenant("gamma")
    before = client.get("/v1/config", headers=a.h).json()["limits"]
    assert before["requests_per_minute"] == {
        "value": 120,
        "source": "plan",
        "description": before["requests_per_minute"]["description"],
    }
    r = client.patch(
        f"/admin/tenants/{a.id}",
        json={"plan": "pro", "limits": {"requests_per_minute": 99}},
        headers=auth(operator_key),
    )
    assert r.status_code == 200, r.text
    after = client.get("/v1/config", headers=a.h).json()
    assert after["plan"] == "pro"
    assert (
        after["limits"]["requests_per_minute"]["value"],
        after["limits"]["requests_per_minute"]["source"],
    ) == (
        99,
        "tenant",
    )
    assert after["limits"]["tokens_per_day"]["value"] == 50_000_000
