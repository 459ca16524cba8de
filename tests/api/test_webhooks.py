"""The webhook routes on every storage deployment: what registration refuses (422
``webhook_url_refused`` for a URL that can never be sent to, including 127.0.0.1 without
the operator's allowance), the secret answered once, scopes, and one tenant unable to see
or touch another's endpoints or delivery log (404, as for a missing one)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import TenantHandle, auth

SCOPES = ["agents:write", "runs:write", "read", "webhooks:write"]


def _writer(client: TestClient, operator_key: str, t: TenantHandle) -> dict[str, str]:
    r = client.post(
        f"/admin/tenants/{t.id}/keys", json={"name": "wh", "scopes": SCOPES}, headers=auth(operator_key)
    )
    assert r.status_code == 201, r.text
    return auth(r.json()["key"])


def _create(client: TestClient, h: dict[str, str], url: str, events: list[str] | None = None) -> Any:
    body = {"url": url, "event_types": events or ["run.succeeded"]}
    return client.post("/v1/webhooks", json=body, headers=h)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://127.0.0.1/hook", "address_not_allowed"),
        ("https://[::1]/hook", "address_not_allowed"),
        ("https://10.1.2.3/hook", "address_not_allowed"),
        ("https://192.168.1.1/hook", "address_not_allowed"),
        ("https://169.254.169.254/latest/meta-data", "address_not_allowed"),
        ("https://[::ffff:127.0.0.1]/hook", "address_not_allowed"),
        ("https://localhost/hook", "address_not_allowed"),
        ("http://hooks.example.com/", "scheme"),
        ("ftp://hooks.example.com/", "scheme"),
        ("https://user:pw@hooks.example.com/", "userinfo"),
        ("not a url", "scheme"),
    ],
)
def test_registration_refuses_a_url_that_can_never_be_sent_to(
    client: TestClient, operator_key: str, make_tenant: Any, url: str, reason: str
) -> None:
    t = make_tenant("acme")
    h = _writer(client, operator_key, t)
    r = _create(client, h, url)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "webhook_url_refused" and error["details"]["reason"] == reason
    assert client.get("/v1/webhooks", headers=h).json() == []  # nothing written


def test_registration_checks_event_types_and_scopes(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    t = make_tenant("acme")
    h = _writer(client, operator_key, t)
    r = _create(client, h, "https://hooks.example.com/", ["run.exploded"])
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    # The default key has read but not webhooks:write.
    r = _create(client, t.h, "https://hooks.example.com/")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    made = _create(client, h, "https://hooks.example.com/").json()
    assert client.get(f"/v1/webhooks/{made['id']}", headers=t.h).status_code == 200
    assert client.post(f"/v1/webhooks/{made['id']}/rotate", json={}, headers=t.h).status_code == 403


def test_the_secret_is_answered_at_creation_and_rotation_only(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    t = make_tenant("acme")
    h = _writer(client, operator_key, t)
    r = _create(client, h, "https://hooks.example.com/patinox")
    assert r.status_code == 201 and r.headers["Location"] == f"/v1/webhooks/{r.json()['id']}"
    made = r.json()
    assert made["secret"].startswith("whsec_") and made["state"] == "active"
    assert "secret" not in client.get(f"/v1/webhooks/{made['id']}", headers=h).json()
    assert all("secret" not in e for e in client.get("/v1/webhooks", headers=h).json())
    rotated = client.post(f"/v1/webhooks/{made['id']}/rotate", json={"overlap_s": 60}, headers=h).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != made["secret"]
    assert "secret" not in client.delete(f"/v1/webhooks/{made['id']}", headers=h).json()
    assert client.get(f"/v1/webhooks/{made['id']}", headers=h).status_code == 404
    audit = client.get("/v1/audit", headers=h, params={"limit": 500}).json()
    actions = [a["action"] for a in audit if a["action"].startswith("webhook.")]
    assert actions == ["webhook.create", "webhook.rotate", "webhook.delete"]


def test_an_idempotent_registration_and_rotation_happen_once(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    t = make_tenant("acme")
    h = {**_writer(client, operator_key, t), "Idempotency-Key": "reg-1"}
    body = {"url": "https://hooks.example.com/", "event_types": ["run.failed"]}
    first = client.post("/v1/webhooks", json=body, headers=h)
    again = client.post("/v1/webhooks", json=body, headers=h)
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert len(client.get("/v1/webhooks", headers=h).json()) == 1
    # A rotation's retry answers the same new secret, rotated once.
    path = f"/v1/webhooks/{first.json()['id']}/rotate"
    rotated = client.post(path, json={"overlap_s": 0}, headers={**h, "Idempotency-Key": "rot-1"})
    retried = client.post(path, json={"overlap_s": 0}, headers={**h, "Idempotency-Key": "rot-1"})
    assert rotated.status_code == retried.status_code == 200 and rotated.json() == retried.json()
    assert rotated.json()["secret"] != first.json()["secret"]
    audit = client.get("/v1/audit", headers=h, params={"limit": 500}).json()
    assert [a["action"] for a in audit].count("webhook.rotate") == 1


def test_a_tenant_cannot_see_or_touch_another_tenants_endpoints(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    a, b = make_tenant("alpha"), make_tenant("beta")
    ha, hb = _writer(client, operator_key, a), _writer(client, operator_key, b)
    mine = _create(client, ha, "https://alpha.example.com/hook").json()
    missing = "whe_00000000000000000000000000"
    for endpoint_id in (mine["id"], missing):
        for method, path, body in (
            ("GET", "", None),
            ("GET", "/deliveries", None),
            ("POST", "/rotate", {}),
            ("POST", "/ping", None),
            ("POST", "/enable", None),
            ("DELETE", "", None),
        ):
            r = client.request(method, f"/v1/webhooks/{endpoint_id}{path}", json=body, headers=hb)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/webhooks", headers=hb).json() == []
    # A's endpoint is untouched: still there, its secret not rotated.
    got = client.get(f"/v1/webhooks/{mine['id']}", headers=ha).json()
    assert got["updated_at"] == mine["updated_at"] and got["previous_secret_expires_at"] is None
