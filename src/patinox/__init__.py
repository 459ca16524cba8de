"""Patinox: a multi-tenant runtime for AI agents.

The public Python API for embedding the runtime; everything else is internal.

Every public name is imported on first use (PEP 562), so importing one subpackage loads
only what it needs: a process that serves no HTTP (a queue worker, a CLI command) never
loads FastAPI, and a tenant execution process (:mod:`patinox.isolation.template`), which
holds no credentials, never loads the storage layer, SQLAlchemy or the control plane.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from patinox.api import create_app
    from patinox.control import (
        AgentSpec,
        ApiKeys,
        RunRequest,
        Tenant,
        TenantManager,
        TenantSpec,
        TenantUpdate,
    )
    from patinox.errors import PatinoxError
    from patinox.runtime import Runtime, Settings
    from patinox.storage import SqlBackend, TenantStore, open_backend
    from patinox.tenancy import (
        IsolationLevel,
        ResourceLimits,
        TenantContext,
        TenantState,
        TenantThreadPoolExecutor,
        current_tenant,
        run_in_thread,
        tenant_scope,
    )

__version__ = "0.1.0"

#: Where each public name is defined.
_SOURCES = {
    "AgentSpec": "patinox.control",
    "ApiKeys": "patinox.control",
    "IsolationLevel": "patinox.tenancy",
    "PatinoxError": "patinox.errors",
    "ResourceLimits": "patinox.tenancy",
    "RunRequest": "patinox.control",
    "Runtime": "patinox.runtime",
    "Settings": "patinox.runtime",
    "SqlBackend": "patinox.storage",
    "Tenant": "patinox.control",
    "TenantContext": "patinox.tenancy",
    "TenantManager": "patinox.control",
    "TenantSpec": "patinox.control",
    "TenantState": "patinox.tenancy",
    "TenantStore": "patinox.storage",
    "TenantThreadPoolExecutor": "patinox.tenancy",
    "TenantUpdate": "patinox.control",
    "create_app": "patinox.api",
    "current_tenant": "patinox.tenancy",
    "open_backend": "patinox.storage",
    "run_in_thread": "patinox.tenancy",
    "tenant_scope": "patinox.tenancy",
}

__all__ = [
    "AgentSpec",
    "ApiKeys",
    "IsolationLevel",
    "PatinoxError",
    "ResourceLimits",
    "RunRequest",
    "Runtime",
    "Settings",
    "SqlBackend",
    "Tenant",
    "TenantContext",
    "TenantManager",
    "TenantSpec",
    "TenantState",
    "TenantStore",
    "TenantThreadPoolExecutor",
    "TenantUpdate",
    "__version__",
    "create_app",
    "current_tenant",
    "open_backend",
    "run_in_thread",
    "tenant_scope",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (then cached here).

    Raises:
        AttributeError: ``name`` is not a public name of the package.
    """
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value
    return value
