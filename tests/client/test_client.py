"""The Python client (``patinox.client``) against a real server over a socket, on SQLite and
PostgreSQL pool deployments: every resource, typed results, the server's errors as the
package's exceptions, one tenant unable to reach another's objects, and the client's
models held to the server's OpenAPI schema."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from patinox.api import create_app
from patinox.client import (
    Agent,
    AsyncClient,
    Attempt,
    AuditEntry,
    Client,
    IssuedKey,
    Key,
    Me,
    MemoryItem,
    Run,
    Secret,
    Setting,
    Tenant,
    TenantConfig,
    TenantUsage,
    UsageRecord,
    UsageSummary,
)
from patinox.errors import (
    AuthenticationFailed,
    IdempotencyKeyReused,
    InvalidRequest,
    ModelNotAllowed,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    RunFinished,
    ServerError,
    TenantSuspended,
    error_for,
)
from patinox.runtime import Runtime
from tests.replay._serve import serve


@pytest.fixture
def base_url(runtime: Runtime) -> Iterator[str]:
    with serve(create_app(runtime=runtime), lifespan="on") as url:
        yield url


@pytest.fixture
def operator(runtime: Runtime, base_url: str) -> Iterator[Client]:
    secret = runtime.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret
    with Client(base_url, secret) as client:
        yield client


def _tenant(operator: Client, base_url: str, name: str, **limits: Any) -> tuple[Tenant, Client]:
    tenant = operator.admin.tenants.create(name, plan="pro", limits=limits or None)
    key = operator.admin.keys.create("app", tenant_id=tenant.id)
    return tenant, Client(base_url, key.key)


def test_every_tenant_resource_round_trips(operator: Client, base_url: str) -> None:
    tenant, client = _tenant(operator, base_url, "acme")
    with client:
        me = client.me()
        assert isinstance(me, Me) and me.tenant_id == tenant.id and me.plan == "pro"
        config = client.config()
        assert config.limits["max_concurrent_runs"].source == "plan"
        assert config == operator.admin.tenants.config(tenant.id)
        agent = client.agents.create("helper", model="simulated:instant", instructions="Be brief.")
        assert isinstance(agent, Agent) and agent.simulated and agent.instructions == "Be brief."
        assert [a.id for a in client.agents.list()] == [agent.id]
        assert client.agents.update(agent.id, instructions="Be kind.").instructions == "Be kind."
        assert client.agents.get(agent.id).instructions == "Be kind."

        run = client.runs.create(agent.id, "Hello", output_tokens=7)
        assert isinstance(run, Run) and run.status == "succeeded" and run.output_tokens == 7
        assert run.finished and isinstance(run.attempt_history[0], Attempt)
        queued = client.runs.submit(agent.id, "Later", output_tokens=3)
        assert queued.mode == "async" and queued.status in ("queued", "running", "succeeded")
        done = client.runs.wait(queued.id, timeout_s=60, poll_s=0.05)
        assert done.status == "succeeded" and done.output_tokens == 3
        for i in range(3):
            client.runs.create(agent.id, f"more {i}", output_tokens=1)
        listed = list(client.runs.list(page_size=2))  # three pages of two, the last short
        assert len(listed) == 5 and len({r.id for r in listed}) == 5
        assert [r.created_at for r in listed] == sorted((r.created_at for r in listed), reverse=True)
        assert [r.id for r in client.runs.list(agent_id=agent.id, page_size=10)] == [r.id for r in listed]

        assert isinstance(client.memory.put("notes.1", "one"), MemoryItem)
        client.memory.put("notes.2 with/slash, space?&#", "two")
        assert client.memory.get("notes.2 with/slash, space?&#") == "two"
        assert client.memory.list("notes.") == ["notes.1", "notes.2 with/slash, space?&#"]
        client.memory.delete("notes.1")
        with pytest.raises(NotFound):
            client.memory.get("notes.1")

        usage = client.usage()
        assert isinstance(usage, TenantUsage) and len(usage.records) == 5
        assert all(isinstance(r, UsageRecord) for r in usage.records)
        assert usage.tokens_today == sum(r.input_tokens + r.output_tokens for r in usage.records)
        entries = client.audit()
        assert all(isinstance(e, AuditEntry) for e in entries)
        assert {"agent.create", "memory.put"} <= {e.action for e in entries}
        assert client.audit(after_seq=entries[-1].seq) == []

        client.agents.delete(agent.id)
        with pytest.raises(NotFound):
            client.agents.get(agent.id)


def test_operator_resources(operator: Client, base_url: str) -> None:
    tenant, client = _tenant(operator, base_url, "globex")
    assert operator.admin.tenants.get(tenant.id).name == "globex"
    assert tenant.id in {t.id for t in operator.admin.tenants.list()}
    assert operator.admin.tenants.update(tenant.id, plan="free").plan == "free"
    keys = operator.admin.keys.list(tenant.id)
    assert all(isinstance(k, Key) and not isinstance(k, IssuedKey) for k in keys)
    extra = operator.admin.keys.create("reader", tenant_id=tenant.id, scopes=["read"])
    with Client(base_url, extra.key) as reader:
        assert reader.me().scopes == ["read"]
        with pytest.raises(PermissionDenied):
            reader.agents.create("nope")
    revoked = operator.admin.keys.revoke(extra.id, tenant_id=tenant.id)
    assert revoked.revoked_at is not None
    with Client(base_url, extra.key) as gone, pytest.raises(AuthenticationFailed):
        gone.me()
    with client:
        agent = client.agents.create("a", model="simulated:instant")
        client.runs.create(agent.id, "hi", output_tokens=2)
        summary = operator.admin.usage(tenant_id=tenant.id)
        assert [(s.tenant_id, s.runs) for s in summary] == [(tenant.id, 1)]
        assert all(isinstance(s, UsageSummary) for s in summary)
        assert operator.admin.audit(tenant.id)
        operator.admin.tenants.suspend(tenant.id)
        with pytest.raises(TenantSuspended):
            client.agents.list()
        assert operator.admin.tenants.resume(tenant.id).state == "active"
        assert [a.id for a in client.agents.list()] == [agent.id]
    deleted = operator.admin.tenants.delete(tenant.id)
    assert isinstance(deleted, dict)
    assert tenant.id not in {t.id for t in operator.admin.tenants.list()}


def test_server_errors_arrive_as_the_packages_exceptions(operator: Client, base_url: str) -> None:
    _, a = _tenant(operator, base_url, "alpha", tokens_per_day=50)
    _, b = _tenant(operator, base_url, "beta", requests_per_minute=3)
    with a, b:
        agent = a.agents.create("secret-agent", model="simulated:instant")
        # Another tenant's agent, run and memory answer exactly like missing ones.
        for call in (lambda: b.agents.get(agent.id), lambda: b.runs.create(agent.id, "x")):
            with pytest.raises(NotFound) as info:
                call()
            assert info.value.http_status == 404
        with pytest.raises(InvalidRequest):
            a.agents.create("bad name with spaces")
        # The daily token budget: the quota's own exception.
        a.runs.create(agent.id, "spend", output_tokens=30)
        with pytest.raises(QuotaExceeded):
            a.runs.create(agent.id, "spend more", output_tokens=30)
        # The request rate: RateLimited, with Retry-After as retry_after_s.
        with pytest.raises(RateLimited) as limited:
            for _ in range(10):
                b.agents.list()
        assert limited.value.retry_after_s is not None and limited.value.retry_after_s > 0
    with Client(base_url, "ptx_not_a_real_key") as stranger, pytest.raises(AuthenticationFailed):
        stranger.me()


def test_the_async_client(operator: Client, base_url: str) -> None:
    tenant, _ = _tenant(operator, base_url, "initech")
    secret = operator.admin.keys.create("async", tenant_id=tenant.id).key

    async def scenario() -> list[Run]:
        async with AsyncClient(base_url, secret, max_connections=4) as client:
            assert (await client.me()).tenant_id == tenant.id
            agent = await client.agents.create("helper", model="simulated:instant")
            runs = await asyncio.gather(
                *(client.runs.create(agent.id, f"p{i}", output_tokens=2) for i in range(6))
            )
            queued = await client.runs.submit(agent.id, "later", output_tokens=2)
            runs.append(await client.runs.wait(queued.id, timeout_s=60, poll_s=0.05))
            listed = [r async for r in client.runs.list(page_size=3)]
            assert {r.id for r in listed} == {r.id for r in runs}
            await client.memory.put("k", "v")
            assert await client.memory.get("k") == "v"
            assert len((await client.usage()).records) == 7
            with pytest.raises(NotFound):
                await client.agents.get("ag_missing")
            return runs

    runs = asyncio.run(scenario())
    assert all(r.status == "succeeded" for r in runs)


@pytest.mark.only_deployments("sqlite-pool")
def test_client_models_follow_the_servers_schema(runtime: Runtime) -> None:
    schemas = create_app(runtime=runtime).openapi()["components"]["schemas"]
    pairs: dict[type[BaseModel], str] = {
        Tenant: "Tenant",
        Key: "KeyOut",
        IssuedKey: "IssuedKeyOut",
        Agent: "AgentOut",
        Attempt: "AttemptOut",
        Run: "RunOut",
        MemoryItem: "MemoryItemOut",
        Secret: "SecretOut",
        AuditEntry: "AuditOut",
        UsageRecord: "UsageRecordOut",
        UsageSummary: "UsageSummaryOut",
        TenantUsage: "TenantUsageOut",
        TenantConfig: "TenantConfig",
        Setting: "Setting",
        Me: "MeOut",
    }
    for model, name in pairs.items():
        server = schemas[name]
        assert set(model.model_fields) == set(server["properties"]), name
        required = {f for f, info in model.model_fields.items() if info.is_required()}
        assert required <= set(server.get("required", [])), name


def test_importing_the_client_loads_no_server_stack() -> None:
    code = (
        "import sys, patinox.client\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'sqlalchemy', 'pydantic_ai'})\n"
        "print(','.join(loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_error_codes_map_to_the_exception_tree() -> None:
    assert type(error_for("not_found", "gone", {}, 404)) is NotFound
    limited = error_for("rate_limited", "slow down", {"retry_after_s": 2.0, "limit": 3}, 429)
    assert isinstance(limited, RateLimited) and limited.retry_after_s == 2.0 and limited.limit == 3
    newer = error_for("brand_new_code", "from a newer server", {"x": 1}, 418)
    assert isinstance(newer, ServerError) and (newer.code, newer.http_status) == ("brand_new_code", 418)
    again = pickle.loads(pickle.dumps(newer))
    assert (again.code, again.http_status, again.fields) == ("brand_new_code", 418, {"x": 1})
    # A known code with another status than this package's is not forced into the class.
    assert isinstance(error_for("not_found", "odd", {}, 400), ServerError)


def test_keys_a_tenant_manages_itself_and_rotation(operator: Client, base_url: str) -> None:
    tenant, plain = _tenant(operator, base_url, "hooli")
    manager = operator.admin.keys.create("manager", tenant_id=tenant.id, scopes=["keys:write", "read"])
    with plain, Client(base_url, manager.key) as client:
        with pytest.raises(PermissionDenied):
            plain.keys.list()
        reader = client.keys.create("reader", scopes=["read"])
        assert {k.id for k in client.keys.list()} >= {reader.id, manager.id}
        with pytest.raises(PermissionDenied):
            client.keys.create("writer", scopes=["agents:write"])
        rotated = client.keys.rotate(reader.id, overlap_s=0)
        with Client(base_url, reader.key) as old, pytest.raises(AuthenticationFailed):
            old.me()
        with Client(base_url, rotated.key) as new:
            assert new.me().scopes == ["read"]
        assert client.keys.revoke(rotated.id).revoked_at is not None
        # The operator's view of the same keys, with last use recorded.
        listed = {k.id: k for k in operator.admin.keys.list(tenant.id)}
        assert listed[manager.id].last_used_at is not None
        assert listed[reader.id].expires_at is not None
        with pytest.raises(TypeError):
            operator.admin.keys.list()


def test_cancel_and_idempotent_creates(operator: Client, base_url: str) -> None:
    _, client = _tenant(operator, base_url, "umbrella")
    with client:
        slow = client.agents.create("slow", model="simulated:ttft_ms=60000", idempotency_key="agent-1")
        again = client.agents.create("slow", model="simulated:ttft_ms=60000", idempotency_key="agent-1")
        assert again.id == slow.id  # the first answer, nothing created twice
        with pytest.raises(IdempotencyKeyReused):
            client.agents.create("other", idempotency_key="agent-1")
        queued = client.runs.submit(slow.id, "wait", output_tokens=2, idempotency_key="run-1")
        assert client.runs.submit(slow.id, "wait", output_tokens=2, idempotency_key="run-1").id == queued.id
        cancelled = client.runs.cancel(queued.id)
        assert cancelled.status == "failed" and (cancelled.error or {}).get("reason") == "cancelled"
        with pytest.raises(RunFinished):
            client.runs.cancel(queued.id)
        assert len(list(client.runs.list())) == 1


@pytest.mark.only_deployments("sqlite-pool")
def test_secrets_and_a_refused_model_through_the_client(operator: Client, base_url: str) -> None:
    tenant = operator.admin.tenants.create(
        "vault",
        plan="pro",
        limits={"allowed_models": ["simulated:instant"], "default_model": "simulated:instant"},
    )
    key = operator.admin.keys.create(
        "admin", tenant_id=tenant.id, scopes=["read", "agents:write", "secrets:write"]
    )
    with Client(base_url, key.key) as client:
        first = client.secrets.put("provider:openai", "sk-client-canary")
        again = client.secrets.put("provider:openai", "sk-client-canary-2")
        assert (first.version, again.version) == (1, 2)
        assert [s.name for s in client.secrets.list()] == ["provider:openai"]
        assert "sk-client-canary" not in repr(client.secrets.list())
        client.secrets.delete("provider:openai")
        with pytest.raises(NotFound):
            client.secrets.delete("provider:openai")
        with pytest.raises(ModelNotAllowed):
            client.agents.create("b", model="simulated")
