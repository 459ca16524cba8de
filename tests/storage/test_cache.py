"""The key and agent lookup cache: per tenant, bounded, and never stale after a change
made by this or any other process of the deployment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from patinox.control import AgentPatch, AgentSpec, TenantSpec, TenantUpdate
from patinox.errors import AuthenticationFailed, NotFound, TenantSuspended
from patinox.runtime import Runtime, Settings
from patinox.storage._cache import MISS, ChangeEpoch, TenantCache, epoch_for_url
from patinox.tenancy import TenantContext


def _runtime(data_dir: Path) -> Runtime:
    return Runtime.build(Settings.for_data_dir(data_dir))


@pytest.fixture
def two_processes(tmp_path: Path) -> Iterator[tuple[Runtime, Runtime]]:
    """Two runtimes on one embedded deployment: two caches, as two server processes have."""
    first = Runtime.initialise(tmp_path / "d")
    second = _runtime(tmp_path / "d")
    yield first, second
    first.backend.close()
    second.backend.close()


def _tenant_key(rt: Runtime, name: str) -> tuple[str, str]:
    tenant = rt.tenants.create(TenantSpec(name=name, plan="pro"), actor="test")
    return tenant.id, rt.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="test").secret


def test_the_epoch_is_shared_through_its_file(tmp_path: Path) -> None:
    a, b = ChangeEpoch(tmp_path / "e"), ChangeEpoch(tmp_path / "e")
    assert a.read() == b.read() == 0
    a.bump()
    assert b.read() == 1
    code = (
        "import sys; from pathlib import Path; from patinox.storage._cache import ChangeEpoch; "
        "ChangeEpoch(Path(sys.argv[1])).bump()"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "e")], check=True)
    assert a.read() == b.read() == 2
    assert os.stat(tmp_path / "e").st_mode & 0o777 == 0o600


def test_postgres_urls_get_no_cache() -> None:
    assert epoch_for_url("postgresql+psycopg://app@127.0.0.1:5432/patinox") is None
    cache = TenantCache(epoch_for_url("postgresql://app@127.0.0.1/x"))
    seen = cache.epoch()
    cache.put("tn_a", "k", 1, seen)
    assert cache.get("k") is MISS and not cache.enabled


def test_a_value_read_across_a_change_is_not_kept() -> None:
    cache = TenantCache(ChangeEpoch(None))
    seen = cache.epoch()
    cache.changed("tn_a")  # another writer committed while we were reading
    cache.put("tn_a", "k", "old", seen)
    cache.epoch()
    assert cache.get("k") is MISS


def test_one_tenant_cannot_evict_another() -> None:
    cache = TenantCache(ChangeEpoch(None), max_per_tenant=4)
    seen = cache.epoch()
    cache.put("tn_b", ("agent", "tn_b", "x"), "b's", seen)
    for i in range(100):
        cache.put("tn_a", ("agent", "tn_a", i), i, seen)
    assert cache.tenant_size("tn_a") == 4
    assert cache.get(("agent", "tn_b", "x")) == "b's"


def test_entries_expire() -> None:
    now = [0.0]
    cache = TenantCache(ChangeEpoch(None), ttl_s=5, clock=lambda: now[0])
    seen = cache.epoch()
    cache.put("tn_a", "k", 1, seen)
    now[0] = 4.9
    assert cache.get("k") == 1
    now[0] = 5.0
    assert cache.get("k") is MISS


def test_revocation_in_another_process_is_seen_at_once(two_processes: tuple[Runtime, Runtime]) -> None:
    server, other = two_processes
    tenant_id, secret = _tenant_key(server, "acme")
    assert isinstance(server.keys.authenticate(secret), TenantContext)
    assert isinstance(server.keys.authenticate(secret), TenantContext)  # now cached
    key_id = other.keys.authenticate(secret).principal  # type: ignore[union-attr]
    other.keys.revoke(key_id, tenant_id=tenant_id, actor="test")
    with pytest.raises(AuthenticationFailed):
        server.keys.authenticate(secret)


def test_suspension_plan_change_and_deletion_elsewhere_are_seen_at_once(
    two_processes: tuple[Runtime, Runtime],
) -> None:
    server, other = two_processes
    tenant_id, secret = _tenant_key(server, "acme")
    before = server.keys.authenticate(secret)
    assert isinstance(before, TenantContext) and before.plan == "pro"
    other.tenants.update(tenant_id, TenantUpdate(plan="enterprise"), actor="test")
    after = server.keys.authenticate(secret)
    assert isinstance(after, TenantContext) and after.plan == "enterprise"
    other.tenants.suspend(tenant_id, actor="test")
    with pytest.raises(TenantSuspended):
        server.keys.authenticate(secret)
    other.tenants.resume(tenant_id, actor="test")
    server.keys.authenticate(secret)
    other.tenants.delete(tenant_id, actor="test")
    with pytest.raises(AuthenticationFailed):
        server.keys.authenticate(secret)


def test_suspension_by_the_cli_process_is_seen_at_once(tmp_path: Path) -> None:
    server = Runtime.initialise(tmp_path / "d")
    try:
        tenant_id, secret = _tenant_key(server, "acme")
        server.keys.authenticate(secret)
        server.keys.authenticate(secret)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "patinox",
                "tenants",
                "suspend",
                tenant_id,
                "--data-dir",
                str(tmp_path / "d"),
            ],
            check=True,
            capture_output=True,
        )
        with pytest.raises(TenantSuspended):
            server.keys.authenticate(secret)
    finally:
        server.backend.close()


def test_agent_edits_elsewhere_are_seen_at_once(two_processes: tuple[Runtime, Runtime]) -> None:
    server, other = two_processes
    _, secret = _tenant_key(server, "acme")
    ctx = server.keys.authenticate(secret)
    assert isinstance(ctx, TenantContext)
    agent = server.agents.create(ctx, AgentSpec(name="a", model="simulated:instant", instructions="v1"))
    store = server.backend.tenant_store(ctx)
    assert store.get_agent(agent["id"])["instructions"] == "v1"
    assert store.get_agent(agent["id"])["instructions"] == "v1"  # cached
    other.agents.update(ctx, agent["id"], AgentPatch(instructions="v2"))
    assert store.get_agent(agent["id"])["instructions"] == "v2"
    other.agents.delete(ctx, agent["id"])
    with pytest.raises(NotFound):
        store.get_agent(agent["id"])


def test_cached_rows_are_copies(two_processes: tuple[Runtime, Runtime]) -> None:
    server, _ = two_processes
    _, secret = _tenant_key(server, "acme")
    ctx = server.keys.authenticate(secret)
    assert isinstance(ctx, TenantContext)
    agent = server.agents.create(
        ctx, AgentSpec(name="a", model="simulated:instant", instructions="v1", tools=["calculator"])
    )
    store = server.backend.tenant_store(ctx)
    first = store.get_agent(agent["id"])
    first["instructions"] = "changed by a caller"
    first["tools"].append("memory_put")
    again = store.get_agent(agent["id"])
    assert again["instructions"] == "v1" and again["tools"] == ["calculator"]


def test_another_tenants_agent_id_is_not_found_even_when_cached(
    two_processes: tuple[Runtime, Runtime],
) -> None:
    server, _ = two_processes
    _, secret_a = _tenant_key(server, "a")
    _, secret_b = _tenant_key(server, "b")
    ctx_a, ctx_b = server.keys.authenticate(secret_a), server.keys.authenticate(secret_b)
    assert isinstance(ctx_a, TenantContext) and isinstance(ctx_b, TenantContext)
    agent = server.agents.create(ctx_a, AgentSpec(name="a", model="simulated:instant", instructions="x"))
    server.backend.tenant_store(ctx_a).get_agent(agent["id"])  # cached for a
    with pytest.raises(NotFound):
        server.backend.tenant_store(ctx_b).get_agent(agent["id"])


def test_a_cached_principal_still_needs_the_right_secret(two_processes: tuple[Runtime, Runtime]) -> None:
    """The second authentication of a key answers the principal the first built (served from
    the cache), yet a token with the same key prefix and another secret is refused."""
    server, _ = two_processes
    _, secret = _tenant_key(server, "acme")
    first = server.keys.authenticate(secret)
    assert server.keys.authenticate(secret) is first
    forged = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")
    with pytest.raises(AuthenticationFailed):
        server.keys.authenticate(forged)
    assert server.keys.authenticate(secret) is first
