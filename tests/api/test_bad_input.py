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


def test_a_name_with_a_trailing_newline_is_refused(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    """``re.match`` with ``$`` also matches before a final newline, so ``"acme\\n"`` was
    accepted as a second tenant beside ``acme``. Every name is matched whole (an agent
    name's ``pattern`` runs in pydantic's Rust engine, where ``$`` is the end of the text:
    pinned here too)."""
    a = make_tenant("alpha")
    agent = a.agent("x")
    for name in ("x\n", "y\n", "\ny"):
        for method, path in (("POST", "/v1/agents"), ("PATCH", f"/v1/agents/{agent}")):
            r = client.request(method, path, json={"name": name}, headers=a.h)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (name, r.text)
    assert [x["name"] for x in client.get("/v1/agents", headers=a.h).json()] == ["x"]
    op = auth(operator_key)
    assert client.post("/admin/tenants", json={"name": "acme"}, headers=op).status_code == 201
    for name in ("acme\n", "acme\r\n", "\nacme", "ac\nme"):
        r = client.post("/admin/tenants", json={"name": name}, headers=op)
        assert r.status_code == 422, (name, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    assert [t["name"] for t in client.get("/admin/tenants", headers=op).json()] == ["alpha", "acme"]


def test_a_nul_character_is_refused_in_every_text_field_alike(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    """A NUL in agent instructions was ``201`` on SQLite and ``422`` on PostgreSQL (its text
    cannot hold one), the same for an API key's name. Every deployment now answers a NUL
    anywhere in a request body ``422 invalid_request`` before anything reads it, and
    writes nothing; the six characters ``\\u0000`` written as text are not a NUL."""
    op = auth(operator_key)
    a = make_tenant("alpha")
    agent = a.agent("x")
    before = (_snapshot(client, a), client.get(f"/admin/tenants/{a.id}/keys", headers=op).json())
    nul = "\\u0000"  # the JSON escape of U+0000, spelt in the raw body
    for method, path, body in (
        ("POST", "/v1/agents", '{"name": "y", "instructions": "i%s"}'),
        ("POST", "/v1/agents", '{"name": "y%s"}'),
        ("POST", "/v1/agents", '{"name": "y", "model": "simulated%s"}'),
        ("POST", "/v1/agents", '{"name": "y", "tools": ["calculator%s"]}'),
        ("PATCH", f"/v1/agents/{agent}", '{"instructions": "i%s"}'),
        ("POST", f"/v1/agents/{agent}/runs", '{"input": "hello%s"}'),
        ("POST", f"/v1/agents/{agent}/runs", '{"input": "hello%s", "mode": "async"}'),
        ("PUT", "/v1/memory/k", '{"value": "v%s"}'),
        ("PUT", "/v1/memory/k", '{"value": "v", "k%s": 1}'),
        ("POST", f"/admin/tenants/{a.id}/keys", '{"name": "k%s"}'),
        ("POST", f"/admin/tenants/{a.id}/keys", '{"name": "k", "scopes": ["read%s"]}'),
        ("POST", "/admin/tenants", '{"name": "t", "plan": "free%s"}'),
        ("PATCH", f"/admin/tenants/{a.id}", '{"plan": "free%s"}'),
    ):
        headers = {**(op if path.startswith("/admin") else a.h), "Content-Type": "application/json"}
        for spelt in (nul, "\\\\\\u0000"):  # the escape, and an escaped backslash before it
            r = client.request(method, path, content=(body % spelt).encode(), headers=headers)
            assert r.status_code == 422, (method, path, body % spelt, r.text)
            assert r.json()["error"]["code"] == "invalid_request", r.text
    after = (_snapshot(client, a), client.get(f"/admin/tenants/{a.id}/keys", headers=op).json())
    assert after == before
    # An escaped backslash before "u0000" is six characters of text, not a NUL.
    r = client.request(
        "PATCH",
        f"/v1/agents/{agent}",
        content=b'{"instructions": "say \\\\u0000 and \\\\\\\\"}',
        headers={**a.h, "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["instructions"] == "say \\u0000 and \\\\"


def test_timestamps_are_iso_8601_with_an_offset_in_a_range_every_engine_stores(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    """``since=0001-01-01T00:00+14:00`` (a UTC time before year 1) was 422 on one engine and
    200 on the other, and ``since=0.5`` was read as a Unix time. ``since`` is an ISO 8601
    date-time with an offset whose UTC time lies in years 1-9999, on every route and
    deployment alike."""
    a = make_tenant("alpha")
    assert a.run(a.agent("x")).status_code == 200
    op = auth(operator_key)
    refused = (
        "0001-01-01T00:00%2B14:00",
        "9999-12-31T23:59:59-14:00",
        "0.5",
        "1700000000",
        "-1",
        "2024-01-01T00:00:00",  # no offset
        "2024-01-01",
        "yesterday",
        "",
    )
    for path, h in (("/v1/usage", a.h), ("/admin/usage", op)):
        for since in refused:
            r = client.get(f"{path}?since={since}", headers=h)
            assert r.status_code == 422, (path, since, r.text)
            assert r.json()["error"]["code"] == "invalid_request", r.text
        counts = []
        for since in ("2000-01-01T00:00:00Z", "2000-01-01T01:00:00%2B01:00", "0001-01-01T00:00:00Z"):
            r = client.get(f"{path}?since={since}", headers=h)
            assert r.status_code == 200, (path, since, r.text)
            body = r.json()
            counts.append(len(body["records"]) if isinstance(body, dict) else body[0]["runs"])
        assert counts == [1, 1, 1], (path, counts)
        r = client.get(f"{path}?since=9999-12-31T23:59:59Z", headers=h)
        assert r.status_code == 200, r.text


def test_deeply_nested_json_is_malformed_json(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    """JSON nested deeper than the parser recurses answered ``400 bad_request``, a code
    the API does not document; it is ``400 malformed_json`` like any unparsable body."""
    a = make_tenant("alpha")
    before = _snapshot(client, a)
    deep = b"[" * 20_000 + b"]" * 20_000
    for path, h in (("/v1/agents", a.h), ("/admin/tenants", auth(operator_key))):
        r = client.post(path, content=deep, headers={**h, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "malformed_json", r.text
    assert _snapshot(client, a) == before


def test_method_not_allowed_lists_every_method_of_the_path(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    """A 405 named only the first route's method in ``Allow`` (``PUT /v1/agents/{id}``
    answered ``Allow: GET``, though PATCH and DELETE are allowed)."""
    a = make_tenant("alpha")
    agent = a.agent("x")
    op = auth(operator_key)
    for method, path, h, allowed in (
        ("PUT", f"/v1/agents/{agent}", a.h, {"GET", "PATCH", "DELETE"}),
        ("POST", "/v1/memory/k", a.h, {"GET", "PUT", "DELETE"}),
        ("DELETE", "/v1/agents", a.h, {"GET", "POST"}),
        ("GET", f"/v1/agents/{agent}/runs", a.h, {"POST"}),
        ("PUT", f"/admin/tenants/{a.id}", op, {"GET", "PATCH", "DELETE"}),
        ("POST", "/healthz", {}, {"GET"}),
        ("POST", "/openapi.json", {}, {"GET", "HEAD"}),
    ):
        r = client.request(method, path, headers=h)
        assert r.status_code == 405, (method, path, r.text)
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert {m.strip() for m in r.headers["allow"].split(",")} == allowed, (path, r.headers["allow"])
