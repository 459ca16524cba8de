"""Statements the stores execute, built once, and the helpers that build the others.

Building a Core statement costs about 150 us and executing a prebuilt one about 20 us
(bench: a sync run issues a dozen), so the run path reuses the constants here and passes
values as parameters. Tenant-store statements take the tenant as the parameter
``b_tenant_id``, which only :meth:`TenantStore._bound
<patinox.storage.TenantStore>` supplies (from its binding): callers never pass it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, LargeBinary, bindparam, cast, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.elements import BindParameter

from patinox.storage import _schema as s
from patinox.storage._schema import utcnow
from patinox.storage.records import AuditRecord
from patinox.tenancy import new_id

#: PostgreSQL: declares a control-plane transaction (row-level security lets it see every
#: tenant's rows); transaction-local.
SET_CONTROL = text("SELECT set_config('patinox.scope', 'control', true)")
#: PostgreSQL: binds a transaction to one tenant for row-level security; transaction-local.
SET_TENANT = text("SELECT set_config('patinox.tenant_id', :tenant_id, true)")

#: The tenant of a tenant-store statement (see module).
B_TENANT: BindParameter[str] = bindparam("b_tenant_id")
GET_AGENT = select(s.agents).where(s.agents.c.tenant_id == B_TENANT, s.agents.c.id == bindparam("b_id"))
GET_RUN = select(s.runs).where(s.runs.c.tenant_id == B_TENANT, s.runs.c.id == bindparam("b_id"))
#: Executed with the columns to set as parameters (SET follows the parameter names).
UPDATE_RUN = update(s.runs).where(s.runs.c.tenant_id == B_TENANT, s.runs.c.id == bindparam("b_id"))
INSERT_RUN = insert(s.runs)
INSERT_USAGE = insert(s.usage_records)
INSERT_AUDIT = insert(s.audit_log)
_A = s.run_attempts
#: Ends attempt ``b_attempt`` of run ``b_run`` with the values given (outcome, ended_at,
#: tokens), unless it already ended; an attempt the reaper marked ``interrupted`` (its
#: lease expired) is ended by its own worker too, which had only stalled and knows how it
#: really ended.
END_ATTEMPT = update(_A).where(
    _A.c.tenant_id == B_TENANT,
    _A.c.run_id == bindparam("b_run"),
    _A.c.attempt == bindparam("b_attempt"),
    or_(_A.c.outcome.is_(None), _A.c.outcome == "interrupted"),
)


def _usage_upsert(make: Any) -> Any:
    """The usage record of one attempt of a run, replacing the record of that attempt if
    there is one (the reaper's record of an attempt whose worker turned out to be alive
    is superseded by the worker's own, which counts everything the attempt used)."""
    u = s.usage_records
    stmt = make(u)
    columns = (
        "at",
        "model",
        "simulated",
        "input_tokens",
        "output_tokens",
        "tool_calls",
        "duration_ms",
        "cpu_seconds",
        "peak_memory_bytes",
    )
    return stmt.on_conflict_do_update(
        index_elements=[u.c.tenant_id, u.c.run_id, u.c.attempt],
        set_={c: stmt.excluded[c] for c in columns},
    )


#: Per dialect (a placement's engine is PostgreSQL or SQLite).
UPSERT_ATTEMPT_USAGE = {True: _usage_upsert(pg_insert), False: _usage_upsert(sqlite_insert)}
FIND_KEY = (
    select(
        s.api_keys,
        s.tenants.c.state.label("t_state"),
        s.tenants.c.plan.label("t_plan"),
        s.tenants.c.limit_overrides.label("t_limit_overrides"),
        s.tenants.c.isolation_level.label("t_isolation_level"),
        s.tenants.c.storage_model.label("t_storage_model"),
        s.tenants.c.moving_to.label("t_moving_to"),
    )
    .select_from(s.api_keys.outerjoin(s.tenants, s.tenants.c.id == s.api_keys.c.tenant_id))
    .where(s.api_keys.c.prefix == bindparam("b_prefix"))
)
#: Columns naming a tenant row's owner and identity: never in the SET of a store update.
ROW_KEY_COLUMNS = frozenset({"tenant_id", "id"})


#: PostgreSQL: the per-tenant lock agent creations take turns on (transaction-scoped).
LOCK_TENANT_AGENTS = text("SELECT pg_advisory_xact_lock(hashtext('patinox.agents:' || :t))")


def memory_bytes(conn: Connection) -> Any:
    """The statement summing a tenant's stored agent memory, bytes: each entry's sealed
    value plus its key's UTF-8 bytes (keys are stored in clear and count too)."""
    m = s.memory
    key_bytes = (
        func.octet_length(m.c.key)
        if conn.dialect.name == "postgresql"
        else func.length(cast(m.c.key, LargeBinary))
    )
    total = func.coalesce(func.sum(func.length(m.c.value) + key_bytes), 0)
    return select(total).where(m.c.tenant_id == B_TENANT)


#: The tenant columns :data:`FIND_KEY` reads beside a key (as ``t_<name>``).
TENANT_COLUMNS = ("state", "plan", "limit_overrides", "isolation_level", "storage_model", "moving_to")


def usage_summary_query(tenant_id: str | None, since: datetime | None) -> Any:
    """The query of usage totals per tenant, model and simulated flag (runs, input and
    output tokens, tool calls), of one tenant or of every tenant when ``tenant_id`` is
    ``None``, since ``since`` (UTC) or ever."""
    u = s.usage_records
    q = (
        select(
            u.c.tenant_id,
            u.c.model,
            u.c.simulated,
            # Runs, not records: a run executed again after its worker died has a record
            # per attempt that used tokens.
            func.count(u.c.run_id.distinct()).label("runs"),
            func.coalesce(func.sum(u.c.input_tokens), 0).label("input_tokens"),
            func.coalesce(func.sum(u.c.output_tokens), 0).label("output_tokens"),
            func.coalesce(func.sum(u.c.tool_calls), 0).label("tool_calls"),
        )
        .group_by(u.c.tenant_id, u.c.model, u.c.simulated)
        .order_by(u.c.tenant_id, u.c.model)
    )
    if tenant_id is not None:
        q = q.where(u.c.tenant_id == tenant_id)
    if since is not None:
        q = q.where(u.c.at >= since)
    return q


def audit_values(
    tenant_id: str | None,
    actor: str,
    action: str,
    target: str | None,
    outcome: str,
    detail: Mapping[str, Any] | None = None,
) -> AuditRecord:
    """The values of a new audit record (a fresh id, ``at`` now); ``tenant_id`` ``None``
    for an operator-level record."""
    return {
        "tenant_id": tenant_id,
        "id": new_id("au"),
        "at": utcnow(),
        "actor": actor,
        "action": action,
        "target": target,
        "outcome": outcome,
        "detail": dict(detail or {}),
    }


@dataclass(frozen=True, slots=True)
class PreparedWrite:
    """Statements with their parameters, payloads already sealed, for
    :meth:`TenantStore.apply <patinox.storage.TenantStore.apply>`.

    Sealing may read or create the tenant's DEK in a transaction of its own, which must
    not happen inside another open transaction (on SQLite it would wait on that
    transaction's own write lock), so writes that join a transaction are prepared first.
    """

    tenant_id: str
    statements: tuple[tuple[Any, Mapping[str, Any]], ...]
