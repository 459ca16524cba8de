"""Bad input from a tenant, an operator or a model answers a client error and stores nothing.

Attacks: query parameters and ids a database cannot hold (naive or overflowing dates, huge
integers, NUL bytes), values past what a column stores (``max_tool_calls``, limit
overrides), tool arguments that break the memory key rules or cannot be encoded, SQL
wildcards in a memory prefix, an unknown storage model on the command line. Each must
answer a 4xx (or the CLI's one-line ``error:``), never a 5xx or a traceback, and write
nothing. Every test performs the attack and asserts the correct behaviour.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import auth


def test_naive_or_out_of_range_since_is_a_client_error(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    """Attack: ``GET /v1/usage?since=2024-01-01T00:00:00`` (no time zone) or a date whose UTC
    value overflows (``9999-12-31T23:59:59-14:00``). The naive datetime reaches the UTC
    column type and fails there, answered ``503 storage_error`` (a server failure that
    invites retries and pages the operator); the same on ``/admin/usage``.

    Correct: a 4xx ``invalid_request`` (or naive read as UTC and 200), never a 5xx.
    """
    a = make_tenant("alpha")
    for since in ("2024-01-01T00:00:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00%2B14:00"):
        r = client.get(f"/v1/usage?since={since}", headers=a.h)
        assert r.status_code in (200, 422), (since, r.status_code, r.text)
        r = client.get(f"/admin/usage?since={since}", headers=auth(operator_key))
        assert r.status_code in (200, 422), (since, r.status_code, r.text)


def test_huge_after_seq_is_not_an_internal_error(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    """Attack: ``GET /v1/audit?after_seq=99999999999999999999`` (above SQLite's 64-bit INTEGER).
    sqlite3 raises ``OverflowError``, which ``translate_errors`` does not catch: a bare
    ``500 Internal Server Error`` (not even the JSON error shape). Same on ``/admin/audit``.

    Correct: 422 ``invalid_request`` (bound the query parameter) or 200 ``[]``.
    """
    a = make_tenant("alpha")
    for path, h in (("/v1/audit", a.h), ("/admin/audit", auth(operator_key))):
        r = client.get(f"{path}?after_seq=99999999999999999999", headers=h)
        assert r.status_code in (200, 422), (path, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")


def test_huge_max_tool_calls_is_refused_without_a_500(client: TestClient, make_tenant: Any) -> None:
    """Attack: ``POST /v1/agents {"max_tool_calls": 1e20}`` (and the same PATCH). The value
    is not bounded by the schema nor checked against the plan, and the SQLite insert
    overflows: ``500 Internal Server Error``.

    Correct: 422 ``invalid_request``; nothing is written.
    """
    a = make_tenant("alpha")
    agent = a.agent("x")
    r = client.post(
        "/v1/agents",
        json={"name": "big", "model": "simulated:instant", "max_tool_calls": 10**20},
        headers=a.h,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    r = client.patch(f"/v1/agents/{agent}", json={"max_tool_calls": 10**20}, headers=a.h)
    assert r.status_code == 422, r.text
    assert [x["name"] for x in client.get("/v1/agents", headers=a.h).json()] == ["x"]


def test_memory_tool_obeys_the_memory_key_rules(client: TestClient, make_tenant: Any) -> None:
    """Attack: the HTTP API refuses memory keys outside 1-200 characters (and the column is
    ``String(200)``), but the agent's ``memory_put`` tool stores any key: an empty key (not
    addressable or deletable through ``/v1/memory/{key}``) and a 500-character one.

    Correct: the tool refuses such keys (tool failure), so they never reach storage.
    """
    a = make_tenant("alpha")
    agent = a.agent("w", tools=["memory_put"])
    for key in ("", "k" * 500):
        a.run(agent, "/call memory_put " + json.dumps({"key": key, "value": "v"}), output_tokens=1)
    assert client.get("/v1/memory", headers=a.h).json() == []


def test_non_finite_limit_override_is_refused(client: TestClient, operator_key: str) -> None:
    """Attack (operator input): ``POST /admin/tenants {"limits": {"run_timeout_s": "Infinity"}}``
    is accepted (``gt=0`` lets infinity through); the tenant's limits then read ``null`` and
    every run of the tenant is refused with 422 ``timeout_s must be a finite number``.

    Correct: the override is refused at creation with 422 ``invalid_request``.
    """
    r = client.post(
        "/admin/tenants",
        json={"name": "gamma", "limits": {"run_timeout_s": "Infinity"}},
        headers=auth(operator_key),
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"


def test_limit_overrides_beyond_storable_values_are_refused(client: TestClient, operator_key: str) -> None:
    """An override too large for the queue and ledger columns is a 422 at creation, not a
    tenant whose every run fails later."""
    for name, value in (("max_concurrent_runs", 2**63), ("memory_bytes", 2**60), ("run_timeout_s", 1e12)):
        r = client.post(
            "/admin/tenants",
            json={"name": f"big-{name}".replace("_", "-"), "limits": {name: value}},
            headers={"Authorization": f"Bearer {operator_key}"},
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_request"
    assert client.get("/admin/tenants", headers={"Authorization": f"Bearer {operator_key}"}).json() == []


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_nul_bytes_in_ids_and_keys_are_client_errors_not_storage_errors(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: put a NUL byte (``%00``) in a memory key, a run or agent id, a list filter
    or the memory prefix on PostgreSQL. psycopg refuses NUL in text and every such request
    answers ``503 storage_error`` "database error: DataError" — a server-side failure that
    tells clients to retry and lets any tenant make the server log database errors at
    will.

    Correct: a 4xx (422 invalid_request, or 404 for an id that cannot exist), never 5xx.
    """
    a = make_tenant("alpha")
    agent = a.agent("x")
    probes = [
        ("PUT", "/v1/memory/a%00b", {"value": "v"}),
        ("GET", "/v1/memory?prefix=%00", None),
        ("GET", "/v1/runs?agent_id=a%00", None),
        ("GET", "/v1/runs/run%00x", None),
        ("GET", "/v1/agents/ag%00x", None),
        ("POST", "/v1/agents/ag%00x/runs", {"input": "hi", "mode": "async"}),
    ]
    answers = {u: client.request(m, u, json=body, headers=a.h).status_code for m, u, body in probes}
    assert all(400 <= c < 500 for c in answers.values()), answers
    assert a.run(agent, "still fine", output_tokens=1).status_code == 200


@pytest.mark.parametrize(
    "call",
    [
        '/call memory_put {"key": "\\ud800", "value": "v"}',
        '/call calculator {"expression": "1\\udfff"}',
    ],
)
def test_a_lone_surrogate_in_tool_arguments_is_a_model_error_not_an_internal_error(
    client: TestClient, make_tenant: Any, call: str
) -> None:
    """Attack: the JSON body of a run is valid UTF-8, so the API accepts it, but the prompt's
    ``/call`` line carries the JSON escape ``\\ud800`` (a lone surrogate) in the tool's
    arguments. The simulated model decoded them into a string UTF-8 cannot encode and then
    failed serialising its own tool call: the run failed with
    ``reason="internal_error"`` ("the run failed: PydanticSerializationError"), the reason
    kept for bugs, instead of a stable client-facing reason.

    Correct: arguments that cannot be encoded are a malformed ``/call``, like arguments that
    are not JSON: the run fails with ``reason="model_error"`` and nothing is stored.
    """
    a = make_tenant("alpha")
    agent = a.agent("r", tools=["memory_put", "calculator"])
    r = a.run(agent, call)
    assert r.status_code == 502, r.text
    details = r.json()["error"]["details"]
    assert details["reason"] == "model_error", details
    run = client.get(f"/v1/runs/{details['run_id']}", headers=a.h).json()
    assert run["status"] == "failed" and run["error"]["reason"] == "model_error", run
    assert client.get("/v1/memory", headers=a.h).json() == []


def test_memory_prefix_wildcards_are_literal(client: TestClient, make_tenant: Any) -> None:
    """Attack: ``GET /v1/memory?prefix=%`` / ``prefix=_`` hoping the prefix reaches SQL LIKE
    unescaped and lists every key. Defended: ``startswith(..., autoescape=True)``."""
    a = make_tenant("alpha")
    for k in ("abc", "a_c", "zz"):
        client.put(f"/v1/memory/{k}", json={"value": "1"}, headers=a.h)
    assert client.get("/v1/memory?prefix=%25", headers=a.h).json() == []
    assert client.get("/v1/memory?prefix=_", headers=a.h).json() == []
    assert client.get("/v1/memory?prefix=a_", headers=a.h).json() == ["a_c"]


def test_cli_move_to_an_unknown_storage_model_is_a_clean_error(tmp_path: Any, monkeypatch: Any) -> None:
    """Attack: ``patinox tenants move acme --to nonsense`` (or ``--to SILO``). The value is
    passed straight to ``StorageModel(to)`` and the command dies with a ValueError
    traceback instead of the one-line ``error:`` every other CLI refusal gives.

    Correct: exit code 1 (or 2, usage error), no traceback, the valid choices named; a
    name in another case is simply accepted.
    """
    from tests.cli.conftest import cli

    for var in ("PATINOX_DATA_DIR", "PATINOX_DATABASE_URL", "PATINOX_OWNER_URL", "PATINOX_KEK_URL"):
        monkeypatch.delenv(var, raising=False)
    ddir = tmp_path / "d"
    assert cli("init", "--data-dir", str(ddir), "--key-file", str(tmp_path / "op.key")).exit_code == 0
    monkeypatch.setenv("PATINOX_DATA_DIR", str(ddir))
    assert cli("tenants", "create", "acme").exit_code == 0
    result = cli("tenants", "move", "acme", "--to", "nonsense")
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert "pool" in result.output and "silo" in result.output
    # Names are case-insensitive: SILO is silo.
    result = cli("tenants", "move", "acme", "--to", "SILO")
    assert result.exit_code == 0, result.output
