"""The tenant context and its propagation.

One immutable :class:`TenantContext` flows through every operation. It lives in a
:mod:`contextvars` variable, so asyncio tasks inherit it and a scope restores the previous
value on exit; it is never stored on a connection, a thread-local or a module global.
Threads do not inherit context variables: hand work to threads with :func:`run_in_thread`
or :class:`TenantThreadPoolExecutor`, which copy the caller's context explicitly. Worker
processes receive the context as data (:meth:`TenantContext.to_wire`).

Sources: PEP 567 (contextvars); the pattern follows django-tenants and structlog's
contextvars binding.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from pydantic import BaseModel, ConfigDict

from patinox.errors import PermissionDenied, TenantContextAlreadySet, TenantContextMissing
from patinox.tenancy.plans import IsolationLevel, ResourceLimits, StorageModel, effective_limits

_ABSENT = object()  # a tenant row without ``moving_to`` is treated as moving (fail closed)

P = ParamSpec("P")
R = TypeVar("R")


class TenantContext(BaseModel):
    """Who is acting, for which tenant, under which limits. Immutable.

    Attributes:
        tenant_id: the tenant every tenant-scoped operation is bound to.
        principal: the API key id (or ``"cli"``/``"system"``) acting for the tenant.
        scopes: the scopes granted to the principal.
        plan: the tenant's plan name.
        limits: the tenant's effective limits (plan + overrides).
        isolation_level: where the tenant's runs execute.
        storage_model: where the tenant's rows live (pool, bridge, silo).
        writes_held: true while the tenant moves between storage models; its writes are
            then refused (503 ``tenant_moving``) and its reads served.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant_id: str
    principal: str
    scopes: frozenset[str]
    plan: str
    limits: ResourceLimits
    isolation_level: IsolationLevel = IsolationLevel.NAMESPACE
    storage_model: StorageModel = StorageModel.POOL
    writes_held: bool = False

    def require_scope(self, scope: str) -> None:
        """Raise :class:`PermissionDenied` unless ``scope`` was granted."""
        if scope not in self.scopes:
            raise PermissionDenied(f"this key lacks the {scope!r} scope", scope=scope)

    def to_wire(self) -> dict[str, Any]:
        """A JSON-safe dict to send across a process boundary (data, not objects)."""
        return self.model_dump(mode="json")

    @classmethod
    def for_tenant(cls, tenant: Mapping[str, Any], *, principal: str, scopes: Iterable[str]) -> TenantContext:
        """The one way to build a context from a stored tenant row.

        Args:
            tenant: the control plane's tenant row (``id``, ``plan``, ``limit_overrides``,
                ``isolation_level``, ``storage_model``, ``moving_to``).
            principal: the key id, ``"cli"`` or ``"system"`` acting for the tenant.
            scopes: the scopes granted to that principal.

        Fails closed: a tenant being moved between storage models (``moving_to`` set, or
        the column absent) gets ``writes_held`` so its writes are refused.

        Raises:
            KeyError: the row lacks a required column.
            InvalidRequest: the row names a plan this deployment does not define.
        """
        return cls(
            tenant_id=tenant["id"],
            principal=principal,
            scopes=frozenset(scopes),
            plan=tenant["plan"],
            limits=effective_limits(tenant["plan"], tenant["limit_overrides"]),
            isolation_level=IsolationLevel(tenant["isolation_level"]),
            storage_model=StorageModel(tenant["storage_model"]),
            writes_held=tenant.get("moving_to", _ABSENT) is not None,
        )

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> TenantContext:
        """Rebuild a context sent with :meth:`to_wire`."""
        return cls.model_validate(data)


_current: contextvars.ContextVar[TenantContext | None] = contextvars.ContextVar(
    "patinox_tenant", default=None
)


class tenant_scope:
    """``with tenant_scope(ctx):`` makes ``ctx`` the current tenant for the body (and hands
    it back); restores the previous value on exit. A class, not a generator: every tenant
    request enters one.

    Raises:
        TenantContextAlreadySet: on entering, when a tenant scope is already active in this
            context. Scopes do not nest: acting for two tenants at once is always a bug.
    """

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: TenantContext) -> None:
        self._ctx = ctx
        self._token: contextvars.Token[TenantContext | None] | None = None

    def __enter__(self) -> TenantContext:
        active = _current.get()
        if active is not None:
            raise TenantContextAlreadySet(
                "a tenant scope is already active", active_tenant_id=active.tenant_id
            )
        self._token = _current.set(self._ctx)
        return self._ctx

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: object) -> None:
        assert self._token is not None
        _current.reset(self._token)
        self._token = None


def clear_inherited_tenant() -> bool:
    """Drop a tenant context that the current task inherited; for request entry points.

    A request never legitimately starts inside a tenant scope, yet an ASGI server may
    hand a request's task a copy of the previous request's context: uvicorn's h11
    protocol does when it paused reading for a large body on a keep-alive connection
    (CPython gh-140947, uvicorn #2167). Calling this first thing in the request's own task
    makes the request start with no tenant whatever the server did. Returns whether a
    tenant had leaked in.
    """
    if _current.get() is None:
        return False
    _current.set(None)
    return True


def current_tenant() -> TenantContext:
    """The active tenant context.

    Raises:
        TenantContextMissing: no tenant scope is active (fail closed).
    """
    ctx = _current.get()
    if ctx is None:
        raise TenantContextMissing("this operation needs a tenant context and none is active")
    return ctx


def current_tenant_or_none() -> TenantContext | None:
    """The active tenant context, or ``None`` for operator/system code paths."""
    return _current.get()


def tenant_in(context: contextvars.Context) -> TenantContext | None:
    """The tenant context active in ``context`` (a :class:`contextvars.Context`, such as
    the one an event-loop callback will run in), or ``None``. Read-only: used to schedule
    a callback by the tenant it works for."""
    return context.get(_current)


def run_in_thread(
    executor: ThreadPoolExecutor, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs
) -> Future[R]:
    """Submit ``fn`` to ``executor`` inside a copy of the caller's context (tenant included)."""
    ctx = contextvars.copy_context()
    return executor.submit(ctx.run, fn, *args, **kwargs)  # type: ignore[arg-type]


class TenantThreadPoolExecutor(ThreadPoolExecutor):
    """A thread pool whose ``submit`` runs each task in a copy of the submitter's context.

    A plain :class:`ThreadPoolExecutor` runs tasks in the worker thread's own (empty or
    stale) context; this one gives each task exactly the submitter's tenant or none.
    """

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        ctx = contextvars.copy_context()
        return super().submit(ctx.run, fn, *args, **kwargs)
