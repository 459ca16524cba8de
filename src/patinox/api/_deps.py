"""Request dependencies: the runtime, the operator principal, the tenant context by scope;
and the bearer security scheme the OpenAPI document declares."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from patinox.control import OperatorPrincipal
from patinox.errors import PermissionDenied
from patinox.runtime import Runtime
from patinox.storage import TenantStore
from patinox.tenancy import TenantContext, current_tenant

#: The ``Authorization: Bearer <API key>`` scheme the OpenAPI document declares on every
#: ``/admin`` and ``/v1`` operation (Swagger UI's "Authorize"). A declaration only:
#: :class:`~patinox.api._middleware.TenancyMiddleware` authenticates every such request
#: before routing, so no per-request dependency re-reads the header.
BEARER_SCHEME_NAME = "bearerAuth"
BEARER_SCHEME: dict[str, str] = {
    "type": "http",
    "scheme": "bearer",
    "description": "A Patinox API key (`ptx_...`): a tenant key for `/v1`, an operator key for `/admin`.",
}


async def _runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def _operator(request: Request) -> OperatorPrincipal:
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, OperatorPrincipal):
        raise PermissionDenied("admin routes need an operator key", scope="admin")
    return principal


# Dependencies are ``async`` so FastAPI runs them on the event loop, not in its thread pool.
def _scoped(scope: str) -> object:
    async def dep() -> TenantContext:
        ctx = current_tenant()
        ctx.require_scope(scope)
        return ctx

    return Depends(dep)


async def _store(request: Request) -> TenantStore:
    """The request tenant's store: bound by the tenant context the middleware entered."""
    rt: Runtime = request.app.state.runtime
    return rt.backend.tenant_store()


RT = Annotated[Runtime, Depends(_runtime)]
Operator = Annotated[OperatorPrincipal, Depends(_operator)]
Reader = Annotated[TenantContext, _scoped("read")]
AgentWriter = Annotated[TenantContext, _scoped("agents:write")]
RunWriter = Annotated[TenantContext, _scoped("runs:write")]
KeyWriter = Annotated[TenantContext, _scoped("keys:write")]
WebhookWriter = Annotated[TenantContext, _scoped("webhooks:write")]
SecretWriter = Annotated[TenantContext, _scoped("secrets:write")]
Store = Annotated[TenantStore, Depends(_store)]
