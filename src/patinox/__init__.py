"""Patinox: a multi-tenant runtime for AI agents.

The public Python API for embedding the runtime; everything else is internal.
``create_app`` (the HTTP API) is imported on first use, so a process that serves no HTTP
(a queue worker, a CLI command) never loads FastAPI.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from patinox.api import create_app

__version__ = "0.1.0"

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
    """``patinox.create_app``, imported from :mod:`patinox.api` on first use.

    Raises:
        AttributeError: ``name`` is no other lazily imported public name.
    """
    if name == "create_app":
        from patinox.api import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
