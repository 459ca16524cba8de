"""Tenant identity: ids, context and its propagation, plans, limits, isolation levels."""

from patinox.tenancy._ids import looks_like_id, new_id
from patinox.tenancy.context import (
    TenantContext,
    TenantThreadPoolExecutor,
    clear_inherited_tenant,
    current_tenant,
    current_tenant_or_none,
    run_in_thread,
    tenant_in,
    tenant_scope,
)
from patinox.tenancy.plans import (
    PLANS,
    IsolationLevel,
    LimitOverrides,
    Plan,
    ResourceLimits,
    StorageModel,
    TenantState,
    check_model_allowed,
    effective_limits,
    get_plan,
    model_allowed,
)

__all__ = [
    "PLANS",
    "IsolationLevel",
    "LimitOverrides",
    "Plan",
    "ResourceLimits",
    "StorageModel",
    "TenantContext",
    "TenantState",
    "TenantThreadPoolExecutor",
    "check_model_allowed",
    "clear_inherited_tenant",
    "current_tenant",
    "current_tenant_or_none",
    "effective_limits",
    "get_plan",
    "looks_like_id",
    "model_allowed",
    "new_id",
    "run_in_thread",
    "tenant_in",
    "tenant_scope",
]
