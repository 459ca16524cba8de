"""Host-based routing of tenant endpoints (:mod:`patinox.control.endpoints`), as the
tenancy middleware applies it to each ``/v1`` and ``/admin`` request.

- On the deployment's base host (or with no base domain configured) nothing changes: every
  tenant's key and the operator's are accepted.
- On a tenant's host name (``<slug>.<base domain>`` or one of its custom domains) only that
  tenant's keys are accepted; any other key, a tenant key or the operator's, is refused
  exactly as a wrong key is (401 ``unauthenticated``, the same body), so a host name tells
  nothing about the keys of the tenants it does not belong to.
- On any other host name (unknown, a look-alike that normalises to no tenant's name, or
  one that does not normalise) every key is refused the same way.
- ``/admin`` routes answer only on the base host: elsewhere they are not found (404).
"""

from __future__ import annotations

from starlette.types import Scope

from patinox.control import OperatorPrincipal, TenantEndpoints
from patinox.errors import AuthenticationFailed, NotFound
from patinox.tenancy import TenantContext

__all__ = ["check_admin_host", "check_tenant_host", "request_host"]

#: The message of a refused key, the same as an unknown key's
#: (:meth:`patinox.control.ApiKeys.authenticate`).
_BAD_KEY = "invalid API key"


def request_host(scope: Scope) -> str | None:
    """The request's ``Host`` header, read as UTF-8 (a client may send a name in Unicode
    rather than IDNA-encoded); ``None`` when it sent none or it is not UTF-8 (no match)."""
    for name, value in scope.get("headers", []):
        if name == b"host":
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


def check_admin_host(endpoints: TenantEndpoints | None, scope: Scope) -> None:
    """Refuse an ``/admin`` request made on another host than the base host.

    Raises:
        NotFound: the host is not the base host (the route does not exist there).
    """
    if endpoints is None or not endpoints.enabled:
        return
    if not endpoints.locate(request_host(scope)).base:
        raise NotFound("no such route on this host; operator routes answer on the base host only")


def check_tenant_host(
    endpoints: TenantEndpoints | None, scope: Scope, principal: TenantContext | OperatorPrincipal
) -> None:
    """Refuse a key used on a host name that is neither the base host nor its tenant's.

    Raises:
        AuthenticationFailed: as for a wrong key.
    """
    check_host_of(endpoints, scope, principal.tenant_id if isinstance(principal, TenantContext) else None)


def check_host_of(endpoints: TenantEndpoints | None, scope: Scope, tenant_id: str | None) -> None:
    """:func:`check_tenant_host` for a key of ``tenant_id`` (``None``: an operator key),
    before anything else is told of the key (a suspended tenant's key on another tenant's
    host name is a wrong key there, not a suspended tenant's).

    Raises:
        AuthenticationFailed: as for a wrong key.
    """
    if endpoints is None or not endpoints.enabled:
        return
    where = endpoints.locate(request_host(scope))
    if where.base:
        return
    if tenant_id is not None and where.tenant_id == tenant_id:
        return
    raise AuthenticationFailed(_BAD_KEY)
