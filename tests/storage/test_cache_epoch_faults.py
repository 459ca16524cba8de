"""The change epoch under faults: database URLs in URI form, a truncated, deleted or
replaced epoch file, a backend used after (or while) it is closed.

Each failure here let a process keep accepting a revoked key (stale cache) or killed it
(SIGBUS from a mapped file, ValueError from a closed map)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from patinox.api import Runtime, Settings
from patinox.control import TenantSpec
from patinox.errors import AuthenticationFailed
from patinox.storage._cache import MISS, TenantCache, epoch_for_url
from patinox.tenancy import TenantContext


def _tenant_key(rt: Runtime, name: str) -> tuple[str, str, str]:
    tenant = rt.tenants.create(TenantSpec(name=name, plan="pro"), actor="test")
    issued = rt.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="test")
    return tenant.id, str(issued.record["id"]), issued.secret


def _warm(rt: Runtime, secret: str) -> None:
    assert isinstance(rt.keys.authenticate(secret), TenantContext)
    assert isinstance(rt.keys.authenticate(secret), TenantContext)  # served from the cache


@pytest.fixture
def file_uri_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    data = tmp_path / "d"
    data.mkdir()
    monkeypatch.setenv("PATINOX_DATABASE_URL", f"sqlite:///file:{data / 'patinox.db'}?uri=true")
    yield data


def test_a_file_uri_database_on_disk_shares_its_epoch_between_processes(file_uri_env: Path) -> None:
    # sqlite:///file:/path/db?uri=true is an ordinary database file that other processes
    # open too; it used to get a counter private to the process, so another process's
    # revocation stayed unseen for the cache's whole TTL.
    server = Runtime.initialise(file_uri_env)
    other = Runtime.build(Settings.for_data_dir(file_uri_env))
    try:
        tenant_id, key_id, secret = _tenant_key(server, "acme")
        _warm(server, secret)
        other.keys.revoke(key_id, tenant_id=tenant_id, actor="test")
        with pytest.raises(AuthenticationFailed):
            server.keys.authenticate(secret)
    finally:
        server.backend.close()
        other.backend.close()


def test_file_uris_map_to_the_file_beside_the_database(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    for url in (
        f"sqlite:///file:{db}?uri=true",
        f"sqlite:///file:{db}?mode=rwc&uri=true",
        f"sqlite:///file://{db}?uri=true",
        f"sqlite:///file://localhost{db}?uri=true",
    ):
        epoch = epoch_for_url(url)
        assert epoch is not None and epoch.path == Path(f"{db}.epoch"), url
        epoch.close()


def test_engines_sharing_one_in_memory_database_share_one_epoch() -> None:
    # file:NAME?mode=memory&cache=shared is one database for every engine of the process.
    url = "sqlite:///file:hunt3mem?mode=memory&cache=shared&uri=true"
    a, b = TenantCache(epoch_for_url(url)), TenantCache(epoch_for_url(url))
    seen = b.epoch()
    b.put("tn_a", "k", 1, seen)
    a.changed("tn_a")
    b.epoch()
    assert b.get("k") is MISS and b.tenant_size("tn_a") == 0
