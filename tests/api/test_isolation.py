"""Two tenants over every tenant route: the foreign tenant sees nothing, answered like a missing id."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

MISSING_AGENT = "ag_aaaaaaaaaaaaaaaaaaaaaaaaaa"
MISSING_RUN = "run_aaaaaaaaaaaaaaaaaaaaaaaaaa"


def _body_without_id(resp: Any, ident: str, replacement: str) -> Any:
    return resp.text.replace(ident, replacement)


def test_foreign_objects_answer_like_missing_ones(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    b = make_tenant("beta")
    agent = a.agent("secret-agent", instructions="alpha's private instructions")
    run = a.run(agent, "alpha private prompt")
    assert run.status_code == 200, run.text
    run_id = run.json()["id"]
    r = client.put("/v1/memory/alpha-key", json={"value": "alpha secret"}, headers=a.h)
    assert r.status_code == 200

    cases = [
        ("GET", f"/v1/agents/{agent}", None, MISSING_AGENT),
        ("PATCH", f"/v1/agents/{agent}", {"instructions": "pwned"}, MISSING_AGENT),
        ("DELETE", f"/v1/agents/{agent}", None, MISSING_AGENT),
        ("POST", f"/v1/agents/{agent}/runs", {"input": "hi"}, MISSING_AGENT),
        ("GET", f"/v1/runs/{run_id}", None, MISSING_RUN),
        ("GET", "/v1/memory/alpha-key", None, "no-such-key"),
        ("DELETE", "/v1/memory/alpha-key", None, "no-such-key"),
    ]
    for method, path, body, missing in cases:
        foreign = client.request(method, path, json=body, headers=b.h)
        ident = path.split("/")[3]
        absent = client.request(method, path.replace(ident, missing), json=body, headers=b.h)
        assert foreign.status_code == 404, (method, path, foreign.text)
        assert absent.status_code == 404
        assert foreign.json()["error"]["code"] == "not_found"
        # Same body, up to the id the caller sent.
        assert _body_without_id(foreign, ident, "X") == _body_without_id(absent, missing, "X"), (
            method,
            path,
        )

    # Lists show only one's own.
    for path in ("/v1/agents", "/v1/runs", "/v1/memory", "/v1/audit"):
        got = client.get(path, headers=b.h).json()
        assert "alpha" not in str(got), path
    assert client.get("/v1/usage", headers=b.h).json()["records"] == []
    assert client.get("/v1/agents", headers=b.h).json() == []

    # Nothing of alpha changed.
    assert (
        client.get(f"/v1/agents/{agent}", headers=a.h).json()["instructions"]
        == "alpha's private instructions"
    )
    assert client.get("/v1/memory/alpha-key", headers=a.h).json()["value"] == "alpha secret"
    assert client.get(f"/v1/runs/{run_id}", headers=a.h).status_code == 200


def test_same_names_in_two_tenants_are_independent(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    b = make_tenant("beta")
    ida, idb = a.agent("shared-name"), b.agent("shared-name")
    assert ida != idb
    client.put("/v1/memory/k", json={"value": "A"}, headers=a.h)
    client.put("/v1/memory/k", json={"value": "B"}, headers=b.h)
    assert client.get("/v1/memory/k", headers=a.h).json()["value"] == "A"
    assert client.get("/v1/memory/k", headers=b.h).json()["value"] == "B"


def test_memory_tool_in_a_run_is_tenant_bound(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    b = make_tenant("beta")
    client.put("/v1/memory/k", json={"value": "alpha-value"}, headers=a.h)
    agent_b = b.agent("reader", tools=["memory_get"])
    r = b.run(agent_b, '/call memory_get {"key": "k"}', output_tokens=40)
    assert r.status_code == 200, r.text
    assert "alpha-value" not in r.text
    assert r.json()["tool_calls"] == 1


def test_tenant_comes_from_key_not_headers(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    b = make_tenant("beta")
    a.agent("only-alpha")
    h = {**b.h, "X-Tenant-Id": a.id, "Host": f"{a.id}.example"}
    assert client.get("/v1/agents", headers=h).json() == []
    assert client.get("/v1/me", headers=h).json()["tenant_id"] == b.id
