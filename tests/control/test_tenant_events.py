"""Tenant lifecycle events: what a subscribed listener hears, in order, as typed members."""

from __future__ import annotations

from patinox.control import TenantEvent, TenantManager, TenantSpec, TenantUpdate
from patinox.storage import SqlBackend


def test_a_listener_hears_each_lifecycle_change_as_a_tenant_event(backend: SqlBackend) -> None:
    heard: list[tuple[str, TenantEvent]] = []
    tenants = TenantManager(backend)
    tenants.subscribe(lambda tenant_id, event: heard.append((tenant_id, event)))
    t = tenants.create(TenantSpec(name="acme"), actor="test")
    tenants.update(t.id, TenantUpdate(plan="pro"), actor="test")
    tenants.suspend(t.id, actor="test")
    tenants.resume(t.id, actor="test")
    tenants.delete(t.id, actor="test")
    assert heard == [
        (t.id, TenantEvent.CREATED),
        (t.id, TenantEvent.UPDATED),
        (t.id, TenantEvent.SUSPENDED),
        (t.id, TenantEvent.RESUMED),
        (t.id, TenantEvent.DELETING),
        (t.id, TenantEvent.DELETED),
    ]
    assert all(type(event) is TenantEvent for _, event in heard)
    assert TenantEvent.DELETED == "deleted"  # a str enum: listeners comparing strings still work
