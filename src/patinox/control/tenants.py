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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from patinox.agents import required_isolation
from patinox.agents.tools import isolation_allows
from patinox.errors import (
    InvalidRequest,
    InvalidTransition,
    IsolationRequired,
    IsolationUnavailable,
    PatinoxError,
)
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
from patinox.tenancy.config import TenantConfig, layered_config

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
    """A change of plan, limit overrides and/or isolation level; omitted fields stay as
    they are. A change of isolation level is made live (:meth:`TenantManager.change_level`):
    the call returns once the tenant runs at the new level."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: str | None = None
    limits: LimitOverrides | None = None
    isolation_level: IsolationLevel | None = Field(
        default=None,
        description="move the tenant to this isolation level live: new runs wait (queued ones "
        "stay queued, synchronous ones answer 503 tenant_moving), runs in flight drain, then "
        "the new level's executor takes the tenant",
    )
    drain_timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=30 * 86_400,
        description="with isolation_level: the longest wait for runs in flight, seconds, after "
        "which they are cancelled (reason isolation_level_change); default and most: the "
        "plan's run timeout",
    )


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


#: Isolation levels from the least to the most isolated.
_LEVELS = (
    IsolationLevel.NAMESPACE,
    IsolationLevel.PROCESS,
    IsolationLevel.CONTAINER,
    IsolationLevel.DEDICATED,
)
#: Tenant states whose isolation level may change.
_LIVE = (TenantState.ACTIVE.value, TenantState.SUSPENDED.value)
#: Run statuses of a run that may still be executing somewhere.
_UNFINISHED = ("queued", "running")
#: Longest wait, seconds, for runs cancelled at the end of a drain to be settled
#: (other processes notice the new level within a second, see ``RunService.watch_tenants``).
_SETTLE_WAIT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class LevelChange:
    """What :meth:`TenantManager.change_level` did.

    Attributes:
        tenant_id: the tenant.
        old_level: its isolation level before.
        new_level: its isolation level now.
        runs_drained: runs in flight when the change began that finished by themselves.
        runs_cancelled: runs still in flight when the drain timed out, cancelled (each
            failed with reason ``isolation_level_change``).
        drain_s: how long the drain took, seconds.
        resumed: True when this call finished a change interrupted by a crash.
    """

    tenant_id: str
    old_level: IsolationLevel
    new_level: IsolationLevel
    runs_drained: int = 0
    runs_cancelled: int = 0
    drain_s: float = 0.0
    resumed: bool = False


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
        self._require_supported(spec.isolation_level)
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

    def config(self, tenant_id: str) -> TenantConfig:
        """The tenant's effective settings, each with the layer it comes from (deployment
        default, plan, tenant override: :func:`patinox.tenancy.config.layered_config`).

        Raises:
            TenantNotFound: no such tenant (also once deleted).
        """
        t = self.get(tenant_id)
        return layered_config(
            t.id,
            t.plan,
            t.limit_overrides,
            isolation_level=t.isolation_level.value,
            storage_model=t.storage_model.value,
        )

    def list(self, *, include_deleted: bool = False) -> list[Tenant]:
        """Tenants, oldest first."""
        return [Tenant.from_row(r) for r in self._backend.list_tenants(include_deleted=include_deleted)]

    def update(self, tenant_id: str, change: TenantUpdate, *, actor: str) -> Tenant:
        """Change the plan and/or limit overrides (overrides replace the previous set),
        and/or the isolation level (:meth:`change_level`, after the plan and limits, every
        part checked before anything changes).

        Raises:
            TenantNotFound, InvalidRequest, InvalidTransition (tenant being deleted, or
            moving); IsolationUnavailable, IsolationRequired: as :meth:`change_level`.
        """
        current = self._backend.get_tenant(tenant_id)
        self._require(current, {TenantState.ACTIVE, TenantState.SUSPENDED}, "update")
        values: Changes = {}
        if change.plan is not None:
            get_plan(change.plan)
            values["plan"] = change.plan
        if change.limits is not None:
            values["limit_overrides"] = change.limits.model_dump(exclude_none=True)
        level = change.isolation_level
        if change.drain_timeout_s is not None and level is None:
            raise InvalidRequest("drain_timeout_s goes with isolation_level", field="drain_timeout_s")
        if not values and level is None:
            raise InvalidRequest("nothing to update: give plan, limits and/or isolation_level")
        if level is not None:
            self._check_level(current, level)
        if values:
            row = self._backend.update_tenant(tenant_id, values, expect_state=current["state"])
            self._audit(tenant_id, actor, "tenant.update", {k: v for k, v in values.items()})
            self._changed(tenant_id, TenantEvent.UPDATED)
        if level is not None:
            self.change_level(tenant_id, level, actor=actor, drain_timeout_s=change.drain_timeout_s)
        return self.get(tenant_id) if level is not None or not values else Tenant.from_row(row)

    def _check_level(self, row: TenantRecord, level: IsolationLevel) -> None:
        """Refuse a change of ``row``'s tenant to ``level`` that cannot be made.

        Raises:
            InvalidTransition: the tenant is being deleted, or moving (storage model or
                another level change).
            IsolationUnavailable: ``level`` is not enforceable here.
            IsolationRequired: an agent of the tenant has a tool needing more than
                ``level`` (field ``agents``: their names).
        """
        self._require(row, {TenantState.ACTIVE, TenantState.SUSPENDED}, "change the isolation level of")
        moving = row["moving_to"]
        if moving is not None and moving != level.value:
            raise InvalidTransition(
                f"the tenant is moving (to {moving}); wait for that to finish first",
                tenant_id=row["id"],
                moving_to=moving,
                action="change_isolation_level",
            )
        self._require_supported(level)
        needing: dict[str, tuple[IsolationLevel, str]] = {}
        for agent in self._backend.acting_on(row["id"]).list_agents():
            required = required_isolation(agent["tools"])
            if not isolation_allows(level, required):
                tool = next(t for t in agent["tools"] if required_isolation([t]) is required)
                needing[agent["name"]] = (required, tool)
        if needing:
            required, tool = max(needing.values(), key=lambda need: _LEVELS.index(need[0]))
            names = sorted(needing)
            raise IsolationRequired(
                f"agent(s) {', '.join(names)} use tools that need isolation level "
                f"{required.value!r} or above (tool {tool!r}); change their tools before "
                f"lowering the tenant to {level.value!r}",
                tool=tool,
                required=required.value,
                isolation_level=level.value,
                agents=names,
            )

    def _require_supported(self, level: IsolationLevel) -> None:
        if level not in self._supported:
            raise IsolationUnavailable(
                f"isolation level {level.value!r} is not available in this "
                f"deployment; available: {', '.join(sorted(lvl.value for lvl in self._supported))}",
                isolation_level=level.value,
            )

    def change_level(
        self,
        tenant_id: str,
        level: IsolationLevel,
        *,
        actor: str,
        drain_timeout_s: float | None = None,
        grace_s: float = 0.2,
        poll_s: float = 0.05,
    ) -> LevelChange:
        """Move the tenant to isolation level ``level`` while it keeps its queue.

        Steps: mark the tenant ``moving_to=<level>`` (compare-and-set; the same hold as a
        storage move: the API answers its writes, synchronous runs included, with 503
        ``tenant_moving`` and ``Retry-After``, and the run queue hands out none of its
        queued runs, which stay queued); wait ``grace_s`` for runs admitted just before;
        drain: wait for its runs in flight (running ones, and queued ones a worker has
        claimed) up to ``drain_timeout_s`` (default and most: the plan's run timeout);
        switch ``isolation_level`` (compare-and-set) and tell the listeners
        (:attr:`TenantEvent.UPDATED`): the run service cancels the runs still executing at
        the old level (failed, reason ``isolation_level_change``; other processes do it
        within a second, ``RunService.watch_tenants``) and the old level's executor
        releases the tenant (a ``process`` pool is stopped); the new level's executor takes
        it at its next run; wait (at most 30 s) until those runs are settled; lift the hold
        (queued runs are handed out again, now at the new level); record
        ``tenant.isolation_level`` in the tenant's audit (``old_level``, ``new_level``,
        ``runs_drained``, ``runs_cancelled``, ``drain_s``).

        A failure before the switch lifts the hold and records a failed
        ``tenant.isolation_level``; the tenant stays at its old level. After a crash of the
        process mid-change, call again with the same ``level``: it finishes the change.

        Called off the event loop that executes this process's runs (the HTTP route runs
        in a worker thread; the command line has no runs of its own).

        Raises:
            TenantNotFound; InvalidTransition: the tenant is being deleted, or moving to
            something else; IsolationUnavailable; IsolationRequired (see :meth:`update`).
        """
        started = time.monotonic()
        level = IsolationLevel(level)
        row = self._backend.get_tenant(tenant_id)
        old = IsolationLevel(row["isolation_level"])
        moving = row["moving_to"]
        if old is level and moving is None:
            return LevelChange(tenant_id=tenant_id, old_level=old, new_level=level)
        self._check_level(row, level)
        limits = effective_limits(row["plan"], row["limit_overrides"])
        # What the new level needs (a dedicated tenant's cores) is reserved before the
        # hold, so a refusal changes nothing.
        if self._isolation is not None and level is not old:
            self._isolation.prepare(tenant_id, level, limits)
        resumed = moving is not None
        if not resumed:
            claim = {"state": _LIVE, "isolation_level": old.value, "moving_to": None}
            if not self._backend.compare_and_set_tenant(tenant_id, claim, {"moving_to": level.value}):
                self._give_back(tenant_id, level)
                raise InvalidTransition(
                    "the tenant changed while the level change started; try again", tenant_id=tenant_id
                )
        timeout_s = min(drain_timeout_s or limits.run_timeout_s, limits.run_timeout_s)
        try:
            time.sleep(grace_s)
            at_start = self._in_flight(tenant_id)
            left = self._wait_for_runs(tenant_id, time.monotonic() + timeout_s, poll_s)
            if old is not level:
                switch = {"state": _LIVE, "isolation_level": old.value, "moving_to": level.value}
                to = {"isolation_level": level.value}
                if not self._backend.compare_and_set_tenant(tenant_id, switch, to):
                    raise InvalidTransition(
                        "the tenant changed during the level change (deleted?)", tenant_id=tenant_id
                    )
        except BaseException as err:
            self._lift(tenant_id, level)
            self._give_back(tenant_id, level)
            outcome = err.code if isinstance(err, PatinoxError) else type(err).__name__
            self._backend.acting_on(tenant_id).append_audit(
                actor=actor,
                action="tenant.isolation_level",
                target=tenant_id,
                outcome="failed",
                detail={"old_level": old.value, "new_level": level.value, "error": outcome},
            )
            raise
        drain_s = time.monotonic() - started
        try:
            # The run service cancels the runs still at the old level; the old executor
            # lets the tenant go.
            self._changed(tenant_id, TenantEvent.UPDATED)
            self._wait_for_runs(tenant_id, time.monotonic() + _SETTLE_WAIT_S, poll_s)
        finally:
            self._lift(tenant_id, level)
        if old is IsolationLevel.DEDICATED and level is not old:
            self._give_back(tenant_id, old)  # its cores go back to shared work
        change = LevelChange(
            tenant_id=tenant_id,
            old_level=old,
            new_level=level,
            runs_drained=max(0, len(at_start) - len(left)),
            runs_cancelled=len(left),
            drain_s=round(drain_s, 3),
            resumed=resumed,
        )
        self._audit(
            tenant_id,
            actor,
            "tenant.isolation_level",
            {
                "old_level": old.value,
                "new_level": level.value,
                "runs_drained": change.runs_drained,
                "runs_cancelled": change.runs_cancelled,
                "drain_s": change.drain_s,
                "drain_timeout_s": timeout_s,
                "resumed": resumed,
            },
        )
        return change

    def _give_back(self, tenant_id: str, level: IsolationLevel) -> None:
        """Release what :meth:`IsolationReservations.prepare` reserved for ``level``
        (only ``dedicated`` reserves anything)."""
        if self._isolation is not None and level is IsolationLevel.DEDICATED:
            self._isolation.release(tenant_id)

    def _lift(self, tenant_id: str, level: IsolationLevel) -> None:
        """End a level change's hold (queued runs are handed out again)."""
        self._backend.compare_and_set_tenant(tenant_id, {"moving_to": level.value}, {"moving_to": None})

    def _in_flight(self, tenant_id: str) -> set[str]:
        """Ids of the tenant's runs that may be executing in some process: running ones
        and queued ones a worker claimed (an unclaimed one waits in the queue, which hands
        out no run of a tenant on hold)."""
        pending = self._backend.acting_on(tenant_id).bulk().run_ids(_UNFINISHED)
        if pending:
            pending -= self._backend.unclaimed_runs(tenant_id)
        return pending

    def _wait_for_runs(self, tenant_id: str, deadline: float, poll_s: float) -> set[str]:
        """Wait until no run of the tenant is in flight or ``deadline`` (monotonic)
        passes; return the runs still in flight."""
        while (left := self._in_flight(tenant_id)) and time.monotonic() < deadline:
            time.sleep(poll_s)
        return left

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
