"""Tenant endpoints: each tenant on ``<slug>.<base domain>`` and its custom domains.

A tenant key on another tenant's host name, an unknown one or a look-alike is refused
exactly as a wrong key is (same status, code and body); the base host accepts every
tenant's key; ``/admin`` answers on the base host only; a deleted tenant's slug is held back
for the quarantine. Every request sets its ``Host`` header (names do not resolve here).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.control import EndpointUpdate, TenantEndpoints
from patinox.errors import AlreadyExists
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend, open_backend
from patinox.storage.crypto import key_provider_from_url
from tests.conftest import Deployment, auth

BASE = "patinox.test"

pytestmark = pytest.mark.only_deployments("sqlite-pool", "pg-pool")


@pytest.fixture
def ep_runtime(
    deployment: Deployment, backend: SqlBackend, kek_url: str, exec_root: Path
) -> Iterator[Runtime]:
    settings = Settings(
        database_url=deployment.db_url,
        owner_url=deployment.owner_url,
        kek_url=kek_url,
        exec_root=exec_root,
        isolation_levels=frozenset(),
        base_domain=BASE,
        base_hosts=("localhost",),
    )
    rt = Runtime.build(settings, backend=backend)
    yield rt
    rt.close()


@pytest.fixture
def ep(ep_runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=ep_runtime), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def op_key(ep_runtime: Runtime) -> str:
    return ep_runtime.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret


def _on(host: str, key: str) -> dict[str, Any]:
    return {**auth(key), "Host": host.encode("utf-8")}


def _tenant(ep: TestClient, op_key: str, name: str) -> tuple[str, str]:
    r = ep.post("/admin/tenants", json={"name": name}, headers=_on(BASE, op_key))
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    r = ep.post(f"/admin/tenants/{tid}/keys", json={"name": "k"}, headers=_on(BASE, op_key))
    assert r.status_code == 201, r.text
    return tid, r.json()["key"]


def _bad_key_answer(ep: TestClient, host: str) -> tuple[int, Any, str | None]:
    r = ep.get("/v1/agents", headers=_on(host, "ptx_aaaaaaaaaaaa_not-a-real-secret"))
    return r.status_code, r.json(), r.headers.get("www-authenticate")


def test_a_tenant_key_answers_on_its_host_and_the_base_host_only(ep: TestClient, op_key: str) -> None:
    acme, acme_key = _tenant(ep, op_key, "acme")
    _, globex_key = _tenant(ep, op_key, "globex")
    r = ep.get("/v1/endpoint", headers=_on(BASE, acme_key))
    assert r.json() == {
        "tenant_id": acme,
        "slug": "acme",
        "domains": [],
        "hosts": [f"acme.{BASE}"],
        "base_domain": BASE,
    }
    for host in (f"acme.{BASE}", "ACME.Patinox.Test.:8443", f"acme.{BASE}:443", BASE, "localhost:8000"):
        assert ep.get("/v1/agents", headers=_on(host, acme_key)).status_code == 200, host
    bad = _bad_key_answer(ep, BASE)
    assert bad[0] == 401 and bad[1]["error"]["code"] == "unauthenticated"
    refused_hosts = (
        f"globex.{BASE}",  # another tenant's
        f"nobody.{BASE}",  # no tenant's
        f"\u0430cme.{BASE}",  # a look-alike: CYRILLIC SMALL LETTER A (IDNA: xn--cme-8cd)
        f"xn--cme-8cd.{BASE}",  # the same, already encoded
        f"acme.{BASE}.evil.example",  # the slug under another domain
        f"a.acme.{BASE}",  # below the tenant's host
        "127.0.0.1",  # not a base host here
        "acme",
    )
    for host in refused_hosts:
        r = ep.get("/v1/agents", headers=_on(host, acme_key))
        assert (r.status_code, r.json(), r.headers.get("www-authenticate")) == bad, host
        assert _bad_key_answer(ep, host) == bad, host
    # Globex's key works on its own host, never on acme's.
    assert ep.get("/v1/agents", headers=_on(f"globex.{BASE}", globex_key)).status_code == 200
    r = ep.get("/v1/agents", headers=_on(f"acme.{BASE}", globex_key))
    assert (r.status_code, r.json(), r.headers.get("www-authenticate")) == bad


def test_a_suspended_tenants_key_on_another_host_is_a_wrong_key_there(ep: TestClient, op_key: str) -> None:
    """Told "suspended" (with its tenant id) only where the key may be used at all."""
    _tenant(ep, op_key, "acme")
    globex, globex_key = _tenant(ep, op_key, "globex")
    r = ep.post(f"/admin/tenants/{globex}/suspend", headers=_on(BASE, op_key))
    assert r.status_code == 200, r.text
    for host in (f"acme.{BASE}", f"nobody.{BASE}", "127.0.0.1"):
        r = ep.get("/v1/agents", headers=_on(host, globex_key))
        assert (r.status_code, r.json(), r.headers.get("www-authenticate")) == _bad_key_answer(ep, host), host
    for host in (f"globex.{BASE}", BASE):
        r = ep.get("/v1/agents", headers=_on(host, globex_key))
        assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_suspended", (host, r.text)


def test_admin_routes_answer_on_the_base_host_only(ep: TestClient, op_key: str) -> None:
    acme, _ = _tenant(ep, op_key, "acme")
    assert ep.get("/admin/tenants", headers=_on(BASE, op_key)).status_code == 200
    assert ep.get("/admin/tenants", headers=_on("localhost", op_key)).status_code == 200
    for host in (f"acme.{BASE}", f"nobody.{BASE}", "127.0.0.1"):
        r = ep.get("/admin/tenants", headers=_on(host, op_key))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (host, r.text)
        r = ep.put(f"/admin/tenants/{acme}/endpoint", json={"slug": "x"}, headers=_on(host, op_key))
        assert r.status_code == 404, host
    # An operator key is not a tenant key on a tenant's host either.
    r = ep.get("/v1/agents", headers=_on(f"acme.{BASE}", op_key))
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"


def test_custom_domains_are_set_by_the_operator(ep: TestClient, op_key: str) -> None:
    acme, acme_key = _tenant(ep, op_key, "acme")
    globex, globex_key = _tenant(ep, op_key, "globex")
    r = ep.put(
        f"/admin/tenants/{acme}/endpoint",
        json={"domains": ["API.acme.example.", "Bücher.example"]},
        headers=_on(BASE, op_key),
    )
    assert r.status_code == 200, r.text
    assert r.json()["domains"] == ["api.acme.example", "xn--bcher-kva.example"]
    assert r.json()["hosts"] == [f"acme.{BASE}", "api.acme.example", "xn--bcher-kva.example"]
    for host in ("api.acme.example", "Api.Acme.Example:443", "xn--bcher-kva.example", "bücher.example"):
        assert ep.get("/v1/agents", headers=_on(host, acme_key)).status_code == 200, host
        assert ep.get("/v1/agents", headers=_on(host, globex_key)).status_code == 401, host
    # Another tenant cannot take them; the base domain and names below it are slugs' only.
    r = ep.put(
        f"/admin/tenants/{globex}/endpoint", json={"domains": ["api.acme.example"]}, headers=_on(BASE, op_key)
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_exists", r.text
    for domain in (BASE, f"acme.{BASE}", "nodot", "bad_name..example"):
        r = ep.put(f"/admin/tenants/{globex}/endpoint", json={"domains": [domain]}, headers=_on(BASE, op_key))
        assert r.status_code == 422, (domain, r.text)
    # Tenants cannot set their own endpoint: the route is the operator's.
    r = ep.put(f"/admin/tenants/{acme}/endpoint", json={"domains": []}, headers=_on(BASE, acme_key))
    assert r.status_code == 403
    # Taking a domain away quarantines it: the tenant's key no longer works there.
    r = ep.put(f"/admin/tenants/{acme}/endpoint", json={"domains": []}, headers=_on(BASE, op_key))
    assert r.json()["hosts"] == [f"acme.{BASE}"]
    assert ep.get("/v1/agents", headers=_on("api.acme.example", acme_key)).status_code == 401
    r = ep.put(
        f"/admin/tenants/{globex}/endpoint", json={"domains": ["api.acme.example"]}, headers=_on(BASE, op_key)
    )
    assert r.status_code == 409 and "held_until" in r.json()["error"]["details"], r.text


@pytest.mark.parametrize("slug", ["Acme", "-acme", "acme-", "xn--cme-8cd", "ab--c", "a.b", "a" * 64, ""])
def test_slugs_are_checked(ep: TestClient, op_key: str, slug: str) -> None:
    acme, _ = _tenant(ep, op_key, "acme")
    r = ep.put(f"/admin/tenants/{acme}/endpoint", json={"slug": slug}, headers=_on(BASE, op_key))
    assert r.status_code == 422, r.text
    assert ep.get(f"/admin/tenants/{acme}/endpoint", headers=_on(BASE, op_key)).json()["slug"] == "acme"


def test_a_deleted_tenants_slug_is_held_back(
    ep: TestClient, op_key: str, ep_runtime: Runtime, deployment: Deployment, kek_url: str
) -> None:
    old, old_key = _tenant(ep, op_key, "shop")
    assert ep.get("/v1/agents", headers=_on(f"shop.{BASE}", old_key)).status_code == 200
    assert ep.delete(f"/admin/tenants/{old}", headers=_on(BASE, op_key)).status_code == 200
    # A new tenant of the same name gets another slug, and no key works on the old host.
    new, new_key = _tenant(ep, op_key, "shop")
    slug = ep.get("/v1/endpoint", headers=_on(BASE, new_key)).json()["slug"]
    assert slug != "shop" and slug.startswith("shop-")
    assert ep.get("/v1/agents", headers=_on(f"shop.{BASE}", new_key)).status_code == 401
    assert ep.get("/v1/agents", headers=_on(f"{slug}.{BASE}", new_key)).status_code == 200
    r = ep.put(f"/admin/tenants/{new}/endpoint", json={"slug": "shop"}, headers=_on(BASE, op_key))
    assert r.status_code == 409 and r.json()["error"]["details"]["host"] == "shop", r.text
    # The quarantine is the deployment's setting: with none, the name is free at once.
    assert ep_runtime.endpoints is not None and ep_runtime.endpoints.quarantine.days == 30
    # Set through another backend (as another process would): the server's cached answer
    # for the name (nobody's) is dropped at once.
    other = open_backend(
        deployment.db_url, owner_url=deployment.owner_url, key_provider=key_provider_from_url(kek_url)
    )
    none = TenantEndpoints(other, base_domain=BASE, quarantine_s=0)
    with pytest.raises(AlreadyExists):
        ep_runtime.endpoints.update(new, EndpointUpdate(slug="shop"), actor="test")
    assert none.update(new, EndpointUpdate(slug="shop"), actor="test").hosts == [f"shop.{BASE}"]
    assert ep.get("/v1/agents", headers=_on(f"shop.{BASE}", new_key)).status_code == 200
    other.close()
    # The slug it gave up is quarantined in turn, even for a tenant made later.
    r = ep.put(
        f"/admin/tenants/{_tenant(ep, op_key, 'other')[0]}/endpoint",
        json={"slug": slug},
        headers=_on(BASE, op_key),
    )
    assert r.status_code == 409, r.text


def test_without_a_base_domain_every_host_answers_every_tenant(client: TestClient, make_tenant: Any) -> None:
    t = make_tenant("acme")
    make_tenant("globex")
    for host in ("globex.example.com", "anything", "127.0.0.1:8000"):
        assert client.get("/v1/agents", headers={**t.h, "Host": host}).status_code == 200, host
    r = client.get("/v1/endpoint", headers=t.h)
    assert r.json()["slug"] == "acme" and r.json()["hosts"] == [] and r.json()["base_domain"] is None
