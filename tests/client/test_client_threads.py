"""``client.threads`` of the Python client against a real server over a socket, on SQLite and
PostgreSQL pool deployments: a conversation kept across runs, paging, deletion, another
tenant's thread unreachable, and the thread models held to the server's OpenAPI schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from patinox.api import create_app
from patinox.client import AsyncClient, Client, Thread, ThreadMessage, ThreadRun
from patinox.errors import InvalidRequest, NotFound, RunFailed
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


def _key(operator: Client, name: str) -> str:
    tenant = operator.admin.tenants.create(name, plan="pro")
    return operator.admin.keys.create("app", tenant_id=tenant.id).key


def test_a_conversation_kept_across_runs(operator: Client, base_url: str) -> None:
    with (
        Client(base_url, _key(operator, "acme")) as client,
        Client(base_url, _key(operator, "globex")) as other,
    ):
        agent = client.agents.create("helper", model="simulated:instant", instructions="be brief")
        thread = client.threads.create({"customer": "c-1"}, idempotency_key="t-1")
        assert isinstance(thread, Thread) and thread.metadata == {"customer": "c-1"} and thread.messages == 0
        assert client.threads.create({"customer": "c-1"}, idempotency_key="t-1") == thread

        first = client.threads.run(thread.id, agent.id, "alpha beta gamma", output_tokens=5)
        assert isinstance(first, ThreadRun) and first.run.status == "succeeded"
        assert [m.role for m in first.messages] == ["user", "assistant"]
        second = client.threads.run(thread.id, agent.id, "delta", output_tokens=4)
        alone = client.threads.run(client.threads.create().id, agent.id, "delta", output_tokens=4)
        assert second.run.input_tokens == alone.run.input_tokens + 3 + 5  # the history reached the model

        kept = list(client.threads.messages(thread.id, page_size=3))  # two pages
        assert all(isinstance(m, ThreadMessage) for m in kept)
        assert [m.content for m in kept] == ["alpha beta gamma", first.run.output, "delta", second.run.output]
        assert client.threads.get(thread.id).messages == 4
        assert [t.id for t in client.threads.list(page_size=1)][-1] == thread.id  # newest first

        for call in (
            lambda: other.threads.get(thread.id),
            lambda: list(other.threads.messages(thread.id)),
            lambda: other.threads.delete(thread.id),
        ):
            with pytest.raises(NotFound):
                call()
        with pytest.raises(InvalidRequest):
            client.threads.create({f"k{i}": "v" for i in range(17)})
        with pytest.raises(RunFailed):
            client.threads.run(
                thread.id, client.agents.create("tooled", tools=["calculator"]).id, "/call nope {}"
            )
        assert client.threads.get(thread.id).messages == 4  # the failed run appended nothing

        client.threads.delete(thread.id)
        with pytest.raises(NotFound):
            client.threads.get(thread.id)


def test_the_async_client_threads(operator: Client, base_url: str) -> None:
    secret = _key(operator, "initech")

    async def scenario() -> list[str]:
        async with AsyncClient(base_url, secret) as client:
            agent = await client.agents.create("helper", model="simulated:instant")
            thread = await client.threads.create()
            for word in ("one", "two", "three"):
                await client.threads.run(thread.id, agent.id, word, output_tokens=2)
            listed = [t.id async for t in client.threads.list()]
            assert listed == [thread.id]
            contents = [m.content async for m in client.threads.messages(thread.id, page_size=2)]
            await client.threads.delete(thread.id)
            with pytest.raises(NotFound):
                await client.threads.get(thread.id)
            return contents

    contents = asyncio.run(scenario())
    assert contents[0::2] == ["one", "two", "three"]


@pytest.mark.only_deployments("sqlite-pool")
def test_thread_models_follow_the_servers_schema(runtime: Runtime) -> None:
    schemas = create_app(runtime=runtime).openapi()["components"]["schemas"]
    pairs: dict[type[BaseModel], str] = {
        Thread: "ThreadOut",
        ThreadMessage: "MessageOut",
        ThreadRun: "ThreadRunOut",
    }
    for model, name in pairs.items():
        server = schemas[name]
        assert set(model.model_fields) == set(server["properties"]), name
        required = {f for f, info in model.model_fields.items() if info.is_required()}
        assert required <= set(server.get("required", [])), name
