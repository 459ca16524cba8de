"""The tenant manager: create, get, list, update, suspend, resume, delete.

State machine (persisted in the ``tenants`` table)::

    active ──suspend──▶ suspended ──resume──▶ active
      │                    │
      └──────delete────────┴──▶ deleting ──purge──▶ deleted (tombstone; id never reused)

Deletion marks the tenant ``deleting`` first (from then on every key of it is refused),
stops its runs, destroys its DEKs (crypto-shredding: nothing of it decrypts any more),
then purges its rows from every tenant-owned table, then leaves a tombstone row so the id
is never handed out again. A crash between the steps leaves ``deleting``; calling
:meth:`TenantManager.delete` again finishes the job.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from patinox.errors import InvalidRequest, InvalidTransition, IsolationUnavailable
from patinox.storage import Changes, SqlBackend, TenantRecord, utcnow
from patinox.tenancy import (
    IsolationLevel,
    LimitOverrides,
    ResourceLimits,
    StorageModel,
    TenantState,
    effective_limits,
    get_plan,
    new_id,
)

#: Matched whole (``fullmatch``): with ``match`` and ``$``, "acme\n" passed as a second "acme".
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _check_name(value: str) -> str:
    if _NAME.fullmatch(value) is None:
        raise ValueError("use 1-63 lowercase letters, digits and '-', starting with a letter or digit")
    return value


class TenantSpec(BaseModel):
    """What an operator asks for when creating a tenant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="unique among live tenants; DNS-label shape")
    plan: str = "free"
    isolation_level: IsolationLevel = IsolationLevel.NAMESPACE
    storage_model: StorageModel = Field(
        default=StorageModel.POOL, description="pool (shared tables), bridge (schema), silo (database)"
    )
    limits: LimitOverrides = Field(default_factory=LimitOverrides)

    _name = field_validator("name")(_check_name)


class TenantUpdate(BaseModel):
    """A change of plan and/or limit overrides; omitted fields stay as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: str | None = None
    limits: LimitOverrides | None = None


class Tenant(BaseModel):
    """A tenant as the control plane shows it."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    plan: str
    state: TenantState
    isolation_level: IsolationLevel
    storage_model: StorageModel
    limit_overrides: dict[str, Any]
    limits: ResourceLimits
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None

    @classmethod
    def from_row(cls, row: TenantRecord) -> Tenant:
        """The tenant of a ``tenants`` row, with its effective limits (columns the model
        does not show, such as ``moving_to``, are left out)."""
        columns: Mapping[str, Any] = row
        return cls(**columns, limits=effective_limits(row["plan"], row["limit_overrides"]))


class TenantEvent(StrEnum):
    """What happened to a tenant, as :meth:`TenantManager.subscribe` listeners hear it.

    A ``str`` enum: each member equals its value (``TenantEvent.DELETED == "deleted"``).
    """

    CREATED = "created"  #: registered and active; listeners set up its resources (execution pools)
    UPDATED = "updated"  #: plan, limits or isolation level changed
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    DELETING = "deleting"  #: before any data is removed; listeners stop the tenant's work
    DELETED = "deleted"


#: Called as ``listener(tenant_id, event)``; used to stop runs and drop per-tenant state
#: held in this process.
TenantListener = Callable[[str, TenantEvent], None]


class IsolationReservations(Protocol):
    """What a tenant's isolation level reserves on this host (dedicated cores)."""

    def prepare(self, tenant_id: str, level: IsolationLevel, limits: ResourceLimits) -> None: ...

    def release(self, tenant_id: str) -> None: ...


class TenantManager:
    """Lifecycle of tenants over a storage backend.

    Args:
        backend: the control-plane store.
        supported_isolation: levels this deployment can enforce; others are refused with
            :class:`IsolationUnavailable` rather than silently run at a weaker level.
        isolation: reserves what a new tenant's level needs before its row is written and
            gives it back if creation fails (``prepare(tenant_id, level, limits)`` may raise
            :class:`IsolationUnavailable`, e.g. no free dedicated core; ``release(tenant_id)``);
            :class:`~patinox.isolation.ExecutorMap` is one.
    """

    def __init__(
        self,
        backend: SqlBackend,
        *,
        supported_isolation: frozenset[IsolationLevel] = frozenset({IsolationLevel.NAMESPACE}),
        isolation: IsolationReservations | None = None,
    ) -> None:
        self._backend = backend
        self._supported = supported_isolation
        self._isolation = isolation
        self._listeners: list[TenantListener] = []

    def subscribe(self, listener: TenantListener) -> None:
        """Call ``listener(tenant_id, event)`` on every change of a tenant's state or limits."""
        self._listeners.append(listener)

    def _changed(self, tenant_id: str, event: TenantEvent) -> None:
        for listener in self._listeners:
            listener(tenant_id, event)

    def _audit(self, tenant_id: str, actor: str, action: str, detail: dict[str, Any]) -> None:
        self._backend.acting_on(tenant_id).append_audit(
            actor=actor, action=action, target=tenant_id, outcome="ok", detail=detail
        )

    def create(self, spec: TenantSpec, *, actor: str) -> Tenant:
        """Validate, register and initialise a tenant; returns it ``active``.

        Raises:
            InvalidRequest: unknown plan.
            IsolationUnavailable: the isolation level is not enforceable here.
            AlreadyExists: a live tenant has that name.
            ConfigurationError: the storage model is not offered by this database.
            StorageError: the schema/database could not be created.
        """
        get_plan(spec.plan)
        if spec.isolation_level not in self._supported:
            raise IsolationUnavailable(
                f"isolation level {spec.isolation_level.value!r} is not available in this "
                f"deployment; available: {', '.join(sorted(lvl.value for lvl in self._supported))}",
                isolation_level=spec.isolation_level.value,
            )
        self._backend.placements.require(spec.storage_model)
        tenant_id = new_id("tn")
        if self._isolation is not None:
            limits = effective_limits(spec.plan, spec.limits.model_dump(exclude_none=True))
            self._isolation.prepare(tenant_id, spec.isolation_level, limits)
        # Storage first, then the registration: a failure leaves no tenant without storage,
        # and a taken name removes the storage again.
        try:
            self._backend.placements.provision(tenant_id, spec.storage_model)
            now = utcnow()
            try:
                row = self._register(tenant_id, spec, now)
            except BaseException:
                self._backend.placements.destroy(tenant_id, spec.storage_model)
                raise
        except BaseException:
            if self._isolation is not None:
                self._isolation.release(tenant_id)
            raise
        self._audit(
            row["id"],
            actor,
            "tenant.create",
            {"name": spec.name, "plan": spec.plan, "storage_model": spec.storage_model.value},
        )
        self._changed(row["id"], TenantEvent.CREATED)
        return Tenant.from_row(row)

    def _register(self, tenant_id: str, spec: TenantSpec, now: datetime) -> TenantRecord:
        return self._backend.insert_tenant(
            {
                "id": tenant_id,
                "name": spec.name,
                "plan": spec.plan,
                "state": TenantState.ACTIVE.value,
                "isolation_level": spec.isolation_level.value,
                "storage_model": spec.storage_model.value,
                "limit_overrides": spec.limits.model_dump(exclude_none=True),
                "created_at": now,
                "updated_at": now,
                "deleted_at": None,
                "keys_destroyed_at": None,
                "moving_to": None,
            }
        )

    def get(self, tenant_id: str) -> Tenant:
        """The tenant. Raises :class:`TenantNotFound` (also once deleted)."""
        return Tenant.from_row(self._backend.get_tenant(tenant_id))

    def list(self, *, include_deleted: bool = False) -> list[Tenant]:
        """Tenants, oldest first."""
        return [Tenant.from_row(r) for r in self._backend.list_tenants(include_deleted=include_deleted)]

    def update(self, tenant_id: str, change: TenantUpdate, *, actor: str) -> Tenant:
        """Change the plan and/or limit overrides (overrides replace the previous set).

        Raises:
            TenantNotFound, InvalidRequest, InvalidTransition (tenant being deleted).
        """
        current = self._backend.get_tenant(tenant_id)
        self._require(current, {TenantState.ACTIVE, TenantState.SUSPENDED}, "update")
        values: Changes = {}
        if change.plan is not None:
            get_plan(change.plan)
            values["plan"] = change.plan
        if change.limits is not None:
            values["limit_overrides"] = change.limits.model_dump(exclude_none=True)
        if not values:
            raise InvalidRequest("nothing to update: give plan and/or limits")
        row = self._backend.update_tenant(tenant_id, values, expect_state=current["state"])
        self._audit(tenant_id, actor, "tenant.update", {k: v for k, v in values.items()})
        self._changed(tenant_id, TenantEvent.UPDATED)
        return Tenant.from_row(row)

    def suspend(self, tenant_id: str, *, actor: str, reason: str = "") -> Tenant:
        """Refuse every call of the tenant from now on; its data is kept.

        Raises:
            TenantNotFound; InvalidTransition unless the tenant is active.
        """
        return self._move(
            tenant_id,
            TenantState.ACTIVE,
            TenantState.SUSPENDED,
            actor,
            "tenant.suspend",
            {"reason": reason},
        )

    def resume(self, tenant_id: str, *, actor: str) -> Tenant:
        """Serve a suspended tenant again.

        Raises:
            TenantNotFound; InvalidTransition unless the tenant is suspended.
        """
        return self._move(tenant_id, TenantState.SUSPENDED, TenantState.ACTIVE, actor, "tenant.resume", {})

    def delete(self, tenant_id: str, *, actor: str) -> dict[str, int]:
        """Delete the tenant and every row it owns; resumable; returns rows purged per table.

        Raises:
            TenantNotFound: no such tenant, or already deleted.
        """
        current = self._backend.get_tenant(tenant_id)
        if current["state"] != TenantState.DELETING.value:
            self._backend.update_tenant(
                tenant_id, {"state": TenantState.DELETING.value}, expect_state=current["state"]
            )
        self._changed(tenant_id, TenantEvent.DELETING)
        # Crypto-shredding first: from here on nothing of the tenant decrypts, whatever
        # rows a crash below might leave for the resumed deletion.
        self._backend.keyring.shred(tenant_id)
        counts = self._backend.purge_tenant(tenant_id, StorageModel(current["storage_model"]))
        self._backend.update_tenant(
            tenant_id,
            {"state": TenantState.DELETED.value, "deleted_at": utcnow()},
            expect_state=TenantState.DELETING.value,
        )
        self._backend.append_operator_audit(
            actor=actor,
            action="tenant.delete",
            target=tenant_id,
            outcome="ok",
            detail={"rows_purged": counts, "name": current["name"]},
        )
        self._changed(tenant_id, TenantEvent.DELETED)
        return counts

    @staticmethod
    def _require(row: TenantRecord, allowed: set[TenantState], action: str) -> None:
        if TenantState(row["state"]) not in allowed:
            raise InvalidTransition(
                f"cannot {action} a tenant that is {row['state']}",
                tenant_id=row["id"],
                state=row["state"],
                action=action,
            )

    def _move(
        self,
        tenant_id: str,
        src: TenantState,
        dst: TenantState,
        actor: str,
        action: str,
        detail: dict[str, Any],
    ) -> Tenant:
        current = self._backend.get_tenant(tenant_id)
        self._require(current, {src}, action.split(".")[1])
        row = self._backend.update_tenant(tenant_id, {"state": dst.value}, expect_state=src.value)
        self._audit(tenant_id, actor, action, detail)
        suspended = dst is TenantState.SUSPENDED
        self._changed(tenant_id, TenantEvent.SUSPENDED if suspended else TenantEvent.RESUMED)
        return Tenant.from_row(row)
