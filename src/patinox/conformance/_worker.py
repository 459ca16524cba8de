"""Code that runs in a worker process (``multiprocessing`` with ``spawn``).

A worker receives data only: the URLs of the deployment and a tenant context as
:meth:`TenantContext.to_wire` output. It opens its own backend (once per deployment) and
reaches tenant data only through a store bound to the context it was sent. It imports
storage and tenancy, never the HTTP API.
"""

from __future__ import annotations

import os
from typing import Any

from patinox.errors import PatinoxError
from patinox.storage import SqlBackend, open_backend
from patinox.storage.crypto import key_provider_from_url
from patinox.tenancy import TenantContext, current_tenant, current_tenant_or_none, tenant_scope

_backends: dict[tuple[str | None, ...], SqlBackend] = {}


def _backend(spec: dict[str, str | None]) -> SqlBackend:
    key = (spec["app_url"], spec["owner_url"], spec["kek_url"])
    backend = _backends.get(key)
    if backend is None:
        app_url, kek_url = spec["app_url"], spec["kek_url"]
        assert app_url is not None and kek_url is not None
        backend = open_backend(
            app_url,
            owner_url=spec["owner_url"],
            key_provider=key_provider_from_url(kek_url),
            migrate_schema=False,
        )
        _backends[key] = backend
    return backend


def _tenant_or_none() -> str | None:
    ctx = current_tenant_or_none()
    return None if ctx is None else ctx.tenant_id


def read_memory(spec: dict[str, str | None], wire: dict[str, Any], key: str) -> dict[str, Any]:
    """Read ``key`` of the tenant in ``wire``: through a store bound to the received context
    explicitly, and inside ``tenant_scope`` of it. Reports the context seen before and after."""
    backend = _backend(spec)
    before = _tenant_or_none()
    ctx = TenantContext.from_wire(wire)
    explicit = backend.tenant_store(ctx).memory_get(key)
    with tenant_scope(ctx):
        scoped_tenant = current_tenant().tenant_id
        scoped = backend.tenant_store().memory_get(key)
    return {
        "pid": os.getpid(),
        "before": before,
        "explicit": explicit,
        "scoped": scoped,
        "scoped_tenant": scoped_tenant,
        "after": _tenant_or_none(),
    }


def read_without_context(spec: dict[str, str | None], key: str) -> dict[str, Any]:
    """Ask for the current tenant's store with no context: must fail closed."""
    backend = _backend(spec)
    outcome: str
    value: str | None = None
    try:
        value = backend.tenant_store().memory_get(key)
        outcome = "read"
    except PatinoxError as err:
        outcome = type(err).__name__
    return {"pid": os.getpid(), "outcome": outcome, "value": value, "tenant": _tenant_or_none()}


def close_all() -> int:
    """Close every backend this worker opened (before the deployment is dropped)."""
    n = len(_backends)
    for backend in _backends.values():
        backend.close()
    _backends.clear()
    return n
