"""Tenant endpoint routes: where a tenant is reached (``GET /v1/endpoint`` for the tenant)
and the operator's setting of its slug and custom domains (``GET``/``PUT
/admin/tenants/{id}/endpoint``, answered on the base host only, as every ``/admin`` route)."""

from __future__ import annotations

from fastapi import APIRouter

from patinox.api._deps import RT, Operator, Reader
from patinox.control import EndpointUpdate, TenantEndpoint, TenantEndpoints
from patinox.errors import ConfigurationError

router = APIRouter(tags=["endpoints"])


def _endpoints(rt: RT) -> TenantEndpoints:
    if rt.endpoints is None:
        raise ConfigurationError("this deployment keeps no tenant endpoints")
    return rt.endpoints


@router.get("/v1/endpoint")
def tenant_endpoint(ctx: Reader, rt: RT) -> TenantEndpoint:
    """The calling tenant's slug, custom domains and host names (``hosts`` is empty when the
    deployment has no base domain)."""
    return _endpoints(rt).get(ctx.tenant_id)


@router.get("/admin/tenants/{tenant_id}/endpoint")
def operator_tenant_endpoint(tenant_id: str, _: Operator, rt: RT) -> TenantEndpoint:
    """A tenant's slug, custom domains and host names."""
    return _endpoints(rt).get(tenant_id)


@router.put("/admin/tenants/{tenant_id}/endpoint")
def set_tenant_endpoint(tenant_id: str, change: EndpointUpdate, op: Operator, rt: RT) -> TenantEndpoint:
    """Set a tenant's slug and/or its custom domains (the whole list). A name given up is
    held back from other tenants for the quarantine. Errors: 404 ``not_found`` (no such
    tenant), 422 ``invalid_request`` (not a slug or host name, a domain under the base
    domain), 409 ``already_exists`` (a name another tenant holds or gave up less than the
    quarantine ago: fields ``host``, ``held_until``)."""
    return _endpoints(rt).update(tenant_id, change, actor=op.key_id)
