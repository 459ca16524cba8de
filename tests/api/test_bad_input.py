"""Bad input answers a clear 4xx with a stable code and changes nothing."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import auth


def _snapshot(client: TestClient, t: Any) -> Any:
    return (
        client.get("/v1/agents", headers=t.h).json(),
        client.get("/v1/runs", headers=t.h).json(),
        client.get("/v1/memory", headers=t.h).json(),
    )


def test_bad_bodies(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    agent = a.agent("x")
    before = _snapshot(client, a)
    cases = [
        ("POST", "/v1/agents", b"{not json", 400, "malformed_json"),
        ("POST", "/v1/agents", {"name": "y", "bogus": 1}, 422, "invalid_request"),
        ("POST", "/v1/agents", {"name": "y", "model": "gpt-17"}, 422, "unknown_model"),
        ("POST", "/v1/agents", {"name": "y", "model": "simulated:warp=9"}, 422, "unknown_model"),
        ("POST", "/v1/agents", {"name": "y", "tools": ["rm_rf"]}, 422, "unknown_tool"),
        ("POST", "/v1/agents", {"name": ""}, 422, "invalid_request"),
        ("POST", "/v1/agents", {"name": "x"}, 409, "already_exists"),
        ("PATCH", f"/v1/agents/{agent}", {"model": "nope"}, 422, "unknown_model"),
        (
            "PATCH",
            f"/v1/agents/{agent}",
            {"tools": ["calculator", "calculator"]},
            422,
            "unknown_tool",
        ),
        ("POST", f"/v1/agents/{agent}/runs", {"input": ""}, 422, "invalid_request"),
        (
            "POST",
            f"/v1/agents/{agent}/runs",
            {"input": "x", "output_tokens": 0},
            422,
            "invalid_request",
        ),
        (
            "POST",
            f"/v1/agents/{agent}/runs",
            {"input": "x", "mode": "later"},
            422,
            "invalid_request",
        ),
        ("POST", "/v1/agents/ag_nope/runs", {"input": "x"}, 404, "not_found"),
        ("PUT", "/v1/memory/k", {"value": 3}, 422, "invalid_request"),
        ("PUT", "/v1/memory/k", {"value": "v", "extra": True}, 422, "invalid_request"),
        ("GET", "/v1/runs?limit=0", None, 422, "invalid_request"),
        ("GET", "/v1/nowhere", None, 404, "not_found"),
    ]
    for method, path, body, status, code in cases:
        kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = client.request(method, path, headers={**a.h, "Content-Type": "application/json"}, **kw)
        assert r.status_code == status, (method, path, body, r.text)
        assert r.json()["error"]["code"] == code, (method, path, body, r.text)
        assert r.json()["error"]["message"]
    assert _snapshot(client, a) == before


def test_oversized_body_is_refused(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    before = _snapshot(client, a)
    big = {"name": "big", "instructions": "x" * (70 * 1024)}  # over the 64 KiB test limit
    r = client.post("/v1/agents", json=big, headers=a.h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1024

    r = client.post("/v1/agents", content=chunks(), headers={**a.h, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert _snapshot(client, a) == before


def test_bad_admin_input(client: TestClient, operator_key: str) -> None:
    op = auth(operator_key)
    for body, code in (
        ({"name": "Bad Name!"}, "invalid_request"),
        ({"name": "ok", "plan": "gold"}, "invalid_request"),
        ({"name": "ok", "limits": {"requests_per_minute": -1}}, "invalid_request"),
        ({"name": "ok", "limits": {"bogus": 1}}, "invalid_request"),
        ({"name": "ok", "isolation_level": "vm"}, "invalid_request"),
    ):
        r = client.post("/admin/tenants", json=body, headers=op)
        assert r.status_code == 422, body
        assert r.json()["error"]["code"] == code
    assert client.get("/admin/tenants", headers=op).json() == []
    assert client.post("/admin/tenants", json={"name": "ok"}, headers=op).status_code == 201
    r = client.post("/admin/tenants", json={"name": "ok"}, headers=op)
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_exists"
    assert len(client.get("/admin/tenants", headers=op).json()) == 1


def test_null_for_required_agent_fields_is_refused(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    agent = a.agent("x")
    for field in ("name", "model", "tools", "instructions"):
        r = client.patch(f"/v1/agents/{agent}", json={field: None}, headers=a.h)
        assert r.status_code == 422, (field, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    assert client.get(f"/v1/agents/{agent}", headers=a.h).json()["model"] == "simulated:instant"
