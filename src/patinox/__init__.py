"""Patinox: a multi-tenant runtime for AI agents.

The public Python API for embedding the runtime; everything else is internal.
"""

from patinox.api import Runtime, Settings, create_app
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
