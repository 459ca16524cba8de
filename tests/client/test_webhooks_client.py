"""``client.webhooks`` (sync and async) against a real server over a socket: register,
list, get, rotate, ping, read the delivery log, enable, delete; the server's refusals as
the package's exceptions; a receiver checking deliveries with ``verify_signature``; one
tenant unable to reach another's endpoints; the models held to the server's schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from patinox.api import create_app
from patinox.client import (
    AsyncClient,
    Client,
    Webhook,
    WebhookAttempt,
    WebhookPing,
    WebhookWithSecret,
    verify_signature,
)
from patinox.control import TenantSpec
from patinox.errors import NotFound, PermissionDenied, WebhookUrlRefused
from patinox.runtime import Runtime
from tests._webhooks import Receiver, deliver, receiver, rt
from tests.replay._serve import serve

__all__ = ["receiver", "rt"]  # fixtures used by name

SCOPES = ["agents:write", "runs:write", "read", "webhooks:write"]


@pytest.fixture
def base_url(rt: Runtime) -> Iterator[str]:
    with serve(create_app(runtime=rt), lifespan="on") as url:
        yield url


def _tenant_key(rt: Runtime, name: str, scopes: list[str] | None = SCOPES) -> str:
    tenant = rt.tenants.create(TenantSpec(name=name, plan="pro"), actor="test")
    return rt.keys.create(tenant_id=tenant.id, name="app", scopes=scopes, actor="test").secret


def test_the_sync_client_manages_endpoints_and_reads_their_log(
    rt: Runtime, base_url: str, receiver: Receiver
) -> None:
    with Client(base_url, _tenant_key(rt, "acme")) as c:
        made = c.webhooks.create(receiver.url, ["run.succeeded"], description="orders", idempotency_key="w1")
        assert isinstance(made, WebhookWithSecret) and made.secret.startswith("whsec_")
        assert (
            c.webhooks.create(receiver.url, ["run.succeeded"], description="orders", idempotency_key="w1")
            == made
        )
        assert [w.id for w in c.webhooks.list()] == [made.id]
        got = c.webhooks.get(made.id)
        assert isinstance(got, Webhook) and not hasattr(got, "secret") and got.description == "orders"
        ping = c.webhooks.ping(made.id)
        assert isinstance(ping, WebhookPing)
        assert deliver(rt) == 1
        (delivered,) = receiver.received
        assert verify_signature(made.secret, delivered.headers, delivered.body)
        assert delivered.headers["webhook-id"] == ping.delivery_id
        (entry,) = c.webhooks.attempts(made.id)
        assert (
            isinstance(entry, WebhookAttempt)
            and entry.status_code == 200
            and entry.delivery_id == ping.delivery_id
        )
        rotated = c.webhooks.rotate(made.id, overlap_s=60)
        assert rotated.secret != made.secret and rotated.previous_secret_expires_at is not None
        assert c.webhooks.enable(made.id).state == "active"
        assert c.webhooks.delete(made.id).id == made.id
        with pytest.raises(NotFound):
            c.webhooks.get(made.id)
        with pytest.raises(WebhookUrlRefused) as refused:
            c.webhooks.create("http://hooks.example.com/", ["run.failed"])
        assert refused.value.http_status == 422


def test_the_async_client_and_tenant_isolation(rt: Runtime, base_url: str, receiver: Receiver) -> None:
    async def scenario() -> None:
        async with (
            AsyncClient(base_url, _tenant_key(rt, "alpha")) as a,
            AsyncClient(base_url, _tenant_key(rt, "beta")) as b,
            AsyncClient(base_url, _tenant_key(rt, "gamma", ["read"])) as reader,
        ):
            made = await a.webhooks.create(receiver.url, ["run.failed", "run.cancelled"])
            assert (await a.webhooks.get(made.id)).event_types == ["run.cancelled", "run.failed"]
            for call in (
                b.webhooks.get,
                b.webhooks.delete,
                b.webhooks.ping,
                b.webhooks.attempts,
                b.webhooks.enable,
            ):
                with pytest.raises(NotFound):
                    await call(made.id)
            assert await b.webhooks.list() == []
            with pytest.raises(PermissionDenied):
                await reader.webhooks.create(receiver.url, ["run.failed"])
            assert len(await a.webhooks.list()) == 1

    asyncio.run(scenario())


@pytest.mark.only_deployments("sqlite-pool")
def test_webhook_models_follow_the_servers_schema(rt: Runtime) -> None:
    schemas = create_app(runtime=rt).openapi()["components"]["schemas"]
    pairs: dict[type[BaseModel], str] = {
        Webhook: "WebhookOut",
        WebhookWithSecret: "WebhookSecretOut",
        WebhookPing: "WebhookPingOut",
        WebhookAttempt: "WebhookAttemptOut",
    }
    for model, name in pairs.items():
        server = schemas[name]
        assert set(model.model_fields) == set(server["properties"]), name
        required = {f for f, info in model.model_fields.items() if info.is_required()}
        assert required <= set(server.get("required", [])), name
