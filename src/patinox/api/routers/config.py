"""Configuration routes: a tenant's effective settings and the layer each comes from
(``GET /v1/config`` for the tenant, ``GET /admin/tenants/{id}/config`` for the operator)."""

from __future__ import annotations

from fastapi import APIRouter

from patinox.api._deps import RT, Operator, Reader
from patinox.tenancy.config import TenantConfig

router = APIRouter(tags=["config"])


@router.get("/v1/config")
def tenant_config(ctx: Reader, rt: RT) -> TenantConfig:
    """The calling tenant's settings: each limit's effective value and its layer
    (``default`` < ``plan`` < ``tenant``), its isolation level and storage model."""
    return rt.tenants.config(ctx.tenant_id)


@router.get("/admin/tenants/{tenant_id}/config")
def operator_tenant_config(tenant_id: str, _: Operator, rt: RT) -> TenantConfig:
    """A tenant's settings with their layers (as ``GET /v1/config`` answers the tenant)."""
    return rt.tenants.config(tenant_id)
