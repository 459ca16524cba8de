"""Shared fixtures. Conventions enforced here: no network beyond loopback."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.api import Runtime, Settings, create_app
from patinox.storage import SqlBackend, open_backend

_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: Any) -> Any:
    if isinstance(address, tuple) and self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = host == "localhost"
        if not ok:
            raise RuntimeError(f"tests may not reach the network: {address!r}")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'patinox.db'}"


@pytest.fixture
def backend(db_url: str) -> Iterator[SqlBackend]:
    b = open_backend(db_url)
    yield b
    b.close()


@pytest.fixture
def runtime(db_url: str, backend: SqlBackend) -> Runtime:
    return Runtime.build(Settings(database_url=db_url, max_body_bytes=64 * 1024), backend=backend)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def operator_key(runtime: Runtime) -> str:
    return runtime.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret


class TenantHandle:
    """A tenant created through the admin API, with a full-scope key."""

    def __init__(
        self,
        client: TestClient,
        operator_key: str,
        name: str,
        plan: str = "free",
        limits: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        r = client.post(
            "/admin/tenants",
            json={"name": name, "plan": plan, "limits": limits or {}},
            headers=auth(operator_key),
        )
        assert r.status_code == 201, r.text
        self.id: str = r.json()["id"]
        r = client.post(f"/admin/tenants/{self.id}/keys", json={"name": "k"}, headers=auth(operator_key))
        assert r.status_code == 201, r.text
        self.key: str = r.json()["key"]
        self.key_id: str = r.json()["id"]
        self.h = auth(self.key)

    def agent(self, name: str = "a", **kw: Any) -> str:
        body = {"name": name, "model": "simulated:instant", **kw}
        r = self.client.post("/v1/agents", json=body, headers=self.h)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def run(self, agent_id: str, text: str = "hello there", **kw: Any) -> Any:
        return self.client.post(f"/v1/agents/{agent_id}/runs", json={"input": text, **kw}, headers=self.h)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def make_tenant(client: TestClient, operator_key: str) -> Any:
    def make(name: str, plan: str = "free", limits: dict[str, Any] | None = None) -> TenantHandle:
        return TenantHandle(client, operator_key, name, plan, limits)

    return make


def raw_db_bytes(db_url: str) -> bytes:
    """Every byte of the SQLite database on disk, WAL included."""
    path = Path(db_url.removeprefix("sqlite:///"))
    out = b""
    for p in (path, path.with_name(path.name + "-wal")):
        if p.exists():
            out += p.read_bytes()
    return out
