"""A tenant context for tests that need one without a deployment (a key, a tenant row)."""

from __future__ import annotations

from patinox.tenancy import StorageModel, TenantContext, effective_limits


def tenant_context(
    tenant_id: str,
    *,
    plan: str = "free",
    storage_model: StorageModel | str = StorageModel.POOL,
    scopes: frozenset[str] = frozenset({"read"}),
    principal: str = "key_x",
) -> TenantContext:
    """A context for ``tenant_id`` on ``plan`` with the plan's own limits."""
    return TenantContext(
        tenant_id=tenant_id,
        principal=principal,
        scopes=scopes,
        plan=plan,
        limits=effective_limits(plan, None),
        storage_model=StorageModel(storage_model),
    )
