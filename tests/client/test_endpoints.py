"""The client's tenant-endpoint calls against a real server with a base domain: the
operator sets a tenant's slug and domains, the tenant reads its own, a name another tenant
holds is refused as the server's ``already_exists``; the model follows the server's schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from patinox.api import create_app
from patinox.client import AsyncClient, Client, Endpoint
from patinox.control import ApiKeys
from patinox.errors import AlreadyExists
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend
from tests.conftest import Deployment
from tests.replay._serve import serve


@pytest.fixture
def base_url(deployment: Deployment, backend: SqlBackend, kek_url: str, exec_root: Path) -> Iterator[str]:
    settings = Settings(
        database_url=deployment.db_url,
        owner_url=deployment.owner_url,
        kek_url=kek_url,
        exec_root=exec_root,
        isolation_levels=frozenset(),
        base_domain="patinox.test",
        base_hosts=("127.0.0.1",),  # where the client connects: the base host
    )
    rt = Runtime.build(settings, backend=backend)
    with serve(create_app(runtime=rt), lifespan="on") as url:
        yield url
    rt.close()


def test_the_operator_sets_and_the_tenant_reads_its_endpoint(base_url: str, backend: SqlBackend) -> None:
    op_key = ApiKeys(backend).create(tenant_id=None, name="op", scopes=None, actor="test").secret
    with Client(base_url, op_key) as operator:
        acme = operator.admin.tenants.create("acme")
        globex = operator.admin.tenants.create("globex")
        assert operator.admin.tenants.endpoint(acme.id).hosts == ["acme.patinox.test"]
        got = operator.admin.tenants.set_endpoint(acme.id, slug="acme-corp", domains=["Agents.Acme.Example"])
        assert got == Endpoint(
            tenant_id=acme.id,
            slug="acme-corp",
            domains=["agents.acme.example"],
            hosts=["acme-corp.patinox.test", "agents.acme.example"],
            base_domain="patinox.test",
        )
        with pytest.raises(AlreadyExists):
            operator.admin.tenants.set_endpoint(globex.id, domains=["agents.acme.example"])
        key = operator.admin.keys.create("app", tenant_id=acme.id).key
    with Client(base_url, key) as tenant:
        assert tenant.endpoint() == got

    async def from_async() -> Endpoint:
        async with AsyncClient(base_url, key) as client:
            return await client.endpoint()

    assert asyncio.run(from_async()) == got


@pytest.mark.only_deployments("sqlite-pool")
def test_the_endpoint_model_follows_the_servers_schema(base_url: str) -> None:
    server = httpx.get(f"{base_url}/openapi.json").json()["components"]["schemas"]["TenantEndpoint"]
    assert set(Endpoint.model_fields) == set(server["properties"])
    required = {f for f, info in Endpoint.model_fields.items() if info.is_required()}
    assert required <= set(server.get("required", []))
