"""Everything one tenant owns: :class:`TenantStore`.

A store is bound to exactly one tenant when made (by
:meth:`SqlBackend.tenant_store <patinox.storage.SqlBackend.tenant_store>`, from the active
:class:`~patinox.tenancy.TenantContext` or one passed in explicitly as data) and adds the
``tenant_id`` predicate to every statement itself; its callers never pass a tenant id and
cannot name another tenant's rows.

All datetimes are timezone-aware UTC. Driver errors surface as
:class:`~patinox.errors.StorageError` with the original chained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)

from patinox.errors import AlreadyExists, ConfigurationError, InvalidRequest, NotFound, QuotaExceeded
from patinox.storage import _bulk
from patinox.storage import _schema as s
from patinox.storage._cache import MISS, TenantCache, copy_row
from patinox.storage._fast import execute_write
from patinox.storage._idempotency import IdempotencyRecords
from patinox.storage._placement import Placement
from patinox.storage._schema import utcnow
from patinox.storage._sealer import Sealer
from patinox.storage._secrets import TenantSecrets
from patinox.storage._statements import (
    END_ATTEMPT,
    GET_AGENT,
    GET_RUN,
    INSERT_AUDIT,
    INSERT_RUN,
    INSERT_USAGE,
    LOCK_TENANT_AGENTS,
    ROW_KEY_COLUMNS,
    SET_TENANT,
    UPDATE_RUN,
    UPSERT_ATTEMPT_USAGE,
    PreparedWrite,
    audit_values,
    memory_bytes,
    usage_summary_query,
)
from patinox.storage._threads import ThreadRecords
from patinox.storage._webhooks import WebhookEndpoints
from patinox.storage.engine import begin, translate_errors
from patinox.storage.records import (
    AgentRecord,
    AnyRow,
    AttemptRecord,
    AuditEntry,
    AuditRecord,
    Changes,
    RunRecord,
    UsageRecord,
    UsageTotals,
)
from patinox.tenancy import new_id

__all__ = ["TenantStore"]

#: The cache of a store made without one: disabled, so it holds nothing and is shared.
_NO_CACHE = TenantCache(None)


class TenantStore:
    """Everything one tenant owns. Bound at construction; every statement is scoped here.

    Do not construct directly: use :meth:`SqlBackend.tenant_store`.
    """

    __slots__ = ("_agents_limit", "_cache", "_memory_limit", "_placement", "_sealer", "tenant_id")

    def __init__(
        self,
        placement: Placement,
        sealer: Sealer,
        *,
        memory_bytes_limit: int | None = None,
        agents_limit: int | None = None,
        cache: TenantCache | None = None,
    ) -> None:
        self._placement = placement
        self._sealer = sealer
        self._memory_limit = memory_bytes_limit
        self._agents_limit = agents_limit
        self._cache = cache or _NO_CACHE
        self.tenant_id = sealer.tenant_id

    # The only places tenant predicates are built.
    def _where(self, table: Table, **eq: Any) -> list[Any]:
        conds = [table.c.tenant_id == self.tenant_id]
        conds += [table.c[k] == v for k, v in eq.items()]
        return conds

    @staticmethod
    def _settable(values: Mapping[str, Any]) -> Mapping[str, Any]:
        """``values`` for the SET of an update of this tenant's row, refusing the columns
        that say whose and which row it is (an update sets every column it is given)."""
        keys = sorted(ROW_KEY_COLUMNS & values.keys())
        if keys:
            raise InvalidRequest(f"cannot change {', '.join(keys)} of a row", field=keys[0])
        return values

    def _bound(self, params: Mapping[str, Any]) -> AnyRow:
        """``params`` with the store's tenant as ``b_tenant_id``, overriding any value a
        caller put there: every prebuilt statement's tenant comes from here."""
        return {**params, "b_tenant_id": self.tenant_id}

    def _exec(self, conn: Connection, stmt: Any, params: Mapping[str, Any]) -> Any:
        """Execute a prebuilt statement (module constants above) for the store's tenant."""
        return conn.execute(stmt, self._bound(params))

    def _get(self, conn: Connection, table: Table, what: str, **eq: Any) -> AnyRow:
        row = conn.execute(select(table).where(*self._where(table, **eq))).mappings().first()
        if row is None:
            ident = next(iter(eq.values()))
            raise NotFound(f"{what} {ident!r} not found")
        return dict(row)

    def joins(self, target: Connection | Engine) -> bool:
        """True when this tenant's rows live in the database of ``target`` (pool tenants:
        the shared tables), so its writes may share a control-plane transaction there and
        commit or roll back with it (a run's admission and its settlement)."""
        return self._placement.schema is None and self._placement.engine is target.engine

    def _tx(self, joined: Connection | None = None) -> AbstractContextManager[Connection]:
        """A transaction bound to this tenant, or ``joined`` (see :meth:`joins`) with the
        tenant setting added to it on PostgreSQL.

        Raises:
            ConfigurationError: ``joined`` is a transaction on another database.
        """
        if joined is not None and not self._placement.postgres:
            # Joining on SQLite (every step of a pool tenant's run): errors translated, nothing
            # to set; one object instead of a generator.
            if not self.joins(joined):
                raise ConfigurationError("a tenant store can join only a transaction on its own database")
            return translate_errors(joined)
        return self._bound_tx(joined)

    @contextmanager
    def _bound_tx(self, joined: Connection | None) -> Iterator[Connection]:
        p = self._placement
        if joined is not None:
            if not self.joins(joined):
                raise ConfigurationError("a tenant store can join only a transaction on its own database")
            with translate_errors():
                if p.postgres:
                    joined.execute(SET_TENANT, {"tenant_id": self.tenant_id})
                yield joined
            return
        with translate_errors(), begin(p.engine) as conn:
            if p.schema is not None:
                conn.execution_options(schema_translate_map={None: p.schema})
            if p.postgres:
                # Transaction-local: it cannot outlive this transaction on a pooled connection.
                conn.execute(SET_TENANT, {"tenant_id": self.tenant_id})
            yield conn

    # -- agents ---------------------------------------------------------------------

    def create_agent(self, values: Mapping[str, Any]) -> AgentRecord:
        """Insert an agent.

        Raises:
            AlreadyExists: the name is taken in this tenant.
            QuotaExceeded: the tenant already has its ``max_agents`` agents (stores made
                from a tenant context enforce it); fields ``quota``, ``limit``, ``used``,
                ``requested`` (agents). Nothing is written.
        """
        now = utcnow()
        row = {
            **values,
            "tenant_id": self.tenant_id,
            "id": new_id("ag"),
            "created_at": now,
            "updated_at": now,
        }
        try:
            with self._tx() as conn:
                limit = self._agents_limit
                if limit is not None and self._placement.postgres:
                    # Concurrent creators of one tenant take turns, so the count below is exact.
                    conn.execute(LOCK_TENANT_AGENTS, {"t": self.tenant_id})
                # Insert first (on SQLite this takes the write lock), then count; over the
                # quota, the exception rolls the insert back.
                conn.execute(insert(s.agents).values(**row))
                if limit is not None:
                    count = select(func.count()).select_from(s.agents).where(*self._where(s.agents))
                    total = int(conn.execute(count).scalar_one())
                    if total > limit:
                        raise QuotaExceeded(
                            f"this tenant already has its limit of {limit} agents; delete one to make room",
                            tenant_id=self.tenant_id,
                            quota="max_agents",
                            limit=limit,
                            used=total - 1,
                            requested=1,
                        )
        except AlreadyExists as err:
            raise AlreadyExists(f"an agent named {values['name']!r} already exists") from err
        self._cache.changed(self.tenant_id)
        return cast(AgentRecord, row)

    def get_agent(self, agent_id: str) -> AgentRecord:
        """The agent (a copy), served from the cache when nothing changed since it was
        read. Raises :class:`NotFound` (missing and foreign ids alike)."""
        key = ("agent", self.tenant_id, agent_id)
        seen = self._cache.epoch()
        cached: AgentRecord = self._cache.get(key)
        if cached is MISS:
            with self._tx() as conn:
                row = self._exec(conn, GET_AGENT, {"b_id": agent_id}).mappings().first()
            if row is None:
                raise NotFound(f"agent {agent_id!r} not found")
            cached = cast(AgentRecord, dict(row))
            self._cache.put(self.tenant_id, key, cached, seen)
        return copy_row(cached)

    def agent_named(self, name: str) -> AgentRecord:
        """The agent called ``name`` (a copy; names are unique within a tenant), served from
        the cache when nothing changed since it was read.

        Raises:
            NotFound: no agent of this tenant has that name (another tenant's alike).
        """
        key = ("agent_named", self.tenant_id, name)
        seen = self._cache.epoch()
        cached: AgentRecord = self._cache.get(key)
        if cached is MISS:
            q = select(s.agents).where(*self._where(s.agents), s.agents.c.name == name)
            with self._tx() as conn:
                row = conn.execute(q).mappings().first()
            if row is None:
                raise NotFound(f"agent named {name!r} not found")
            cached = cast(AgentRecord, dict(row))
            self._cache.put(self.tenant_id, key, cached, seen)
        return copy_row(cached)

    def list_agents(self) -> list[AgentRecord]:
        """This tenant's agents by name."""
        with self._tx() as conn:
            q = select(s.agents).where(*self._where(s.agents)).order_by(s.agents.c.name)
            return cast(list[AgentRecord], [dict(r) for r in conn.execute(q).mappings()])

    def update_agent(self, agent_id: str, values: Changes) -> AgentRecord:
        """Update an agent's fields. Raises :class:`NotFound` / :class:`AlreadyExists`."""
        try:
            with self._tx() as conn:
                n = conn.execute(
                    update(s.agents)
                    .where(*self._where(s.agents, id=agent_id))
                    .values(**self._settable(values), updated_at=utcnow())
                ).rowcount
                if n != 1:
                    raise NotFound(f"agent {agent_id!r} not found")
                row = self._get(conn, s.agents, "agent", id=agent_id)
        except AlreadyExists as err:
            raise AlreadyExists(f"an agent named {values.get('name')!r} already exists") from err
        self._cache.changed(self.tenant_id)
        return cast(AgentRecord, row)

    def delete_agent(self, agent_id: str) -> None:
        """Delete an agent and its runs (usage records are kept). Raises :class:`NotFound`."""
        with self._tx() as conn:
            conn.execute(delete(s.runs).where(*self._where(s.runs, agent_id=agent_id)))
            if conn.execute(delete(s.agents).where(*self._where(s.agents, id=agent_id))).rowcount != 1:
                raise NotFound(f"agent {agent_id!r} not found")
        self._cache.changed(self.tenant_id)

    # -- runs -----------------------------------------------------------------------

    def create_run(self, values: RunRecord) -> RunRecord:
        """Insert a run row (status ``queued`` or ``running``); returns it with its id.

        ``input`` is stored encrypted (AAD: tenant, ``runs.input``, run id).
        """
        row, write = self.prepare_run(values)
        self.apply(write)
        return row

    def prepare_run(self, values: RunRecord) -> tuple[RunRecord, PreparedWrite]:
        """The run row :meth:`create_run` would insert, and its sealed insert for
        :meth:`apply` (to write it inside another transaction, see :meth:`joins`)."""
        row: RunRecord = {"created_at": utcnow(), "id": new_id("run"), **values, "tenant_id": self.tenant_id}
        stored: AnyRow = {**row, "input": self._sealer.seal("runs.input", row["id"], row["input"])}
        return row, PreparedWrite(self.tenant_id, ((INSERT_RUN, stored),))

    def apply(self, write: PreparedWrite, *, conn: Connection | None = None) -> None:
        """Execute a prepared write in one transaction, or in ``conn`` (see :meth:`joins`).

        Raises:
            ConfigurationError: ``write`` was prepared by another tenant's store.
        """
        if write.tenant_id != self.tenant_id:
            raise ConfigurationError("a prepared write belongs to the store that prepared it")
        with self._tx(conn) as conn:
            for stmt, params in write.statements:
                execute_write(conn, stmt, self._bound(params))

    def _open_run(self, row: AnyRow) -> RunRecord:
        row["input"] = self._sealer.open("runs.input", row["id"], row["input"])
        row["output"] = self._sealer.open("runs.output", row["id"], row["output"])
        return cast(RunRecord, row)

    def get_run(self, run_id: str) -> RunRecord:
        """The run. Raises :class:`NotFound` (missing and foreign ids alike)."""
        with self._tx() as conn:
            found = self._exec(conn, GET_RUN, {"b_id": run_id}).mappings().first()
        if found is None:
            raise NotFound(f"run {run_id!r} not found")
        return self._open_run(dict(found))

    def list_runs(
        self,
        *,
        agent_id: str | None = None,
        limit: int = 50,
        before: str | None = None,
        max_bytes: int | None = None,
    ) -> list[RunRecord]:
        """This tenant's newest runs first.

        Args:
            agent_id: only this agent's runs.
            limit: at most this many runs.
            before: only runs older than this run (a cursor: the last id of a page).
            max_bytes: stop once the runs returned hold this many bytes of stored input
                and output (at least one run is returned), so one listing cannot make the
                process decrypt and hold an unbounded amount for one tenant.

        Raises:
            NotFound: ``before`` is not a run of this tenant.
        """
        r = s.runs
        conds = self._where(r, **({"agent_id": agent_id} if agent_id else {}))
        newest_first = (r.c.created_at.desc(), r.c.id.desc())
        with self._tx() as conn:
            if before is not None:
                mark = self._exec(conn, GET_RUN, {"b_id": before}).mappings().first()
                if mark is None:
                    raise NotFound(f"run {before!r} not found")
                at = mark["created_at"]
                conds.append(or_(r.c.created_at < at, and_(r.c.created_at == at, r.c.id < before)))
            if max_bytes is not None:
                # Sizes first, then the payloads of the runs within the budget only: reading
                # every row of the page and cutting afterwards still held them all at once.
                size = func.length(r.c.input) + func.coalesce(func.length(r.c.output), 0)
                sized = conn.execute(select(r.c.id, size).where(*conds).order_by(*newest_first).limit(limit))
                ids: list[str] = []
                held = 0
                for run_id, stored in sized:
                    held += int(stored)
                    if ids and held > max_bytes:
                        break
                    ids.append(run_id)
                conds.append(r.c.id.in_(ids))
            q = select(r).where(*conds).order_by(*newest_first).limit(limit)
            rows = [dict(x) for x in conn.execute(q).mappings()]
        return [self._open_run(row) for row in rows]

    def update_run(self, run_id: str, values: RunRecord) -> None:
        """Update a run's fields. Raises :class:`NotFound`."""
        with self._tx() as conn:
            n = self._exec(conn, UPDATE_RUN, {**self._settable(values), "b_id": run_id}).rowcount
        if n != 1:
            raise NotFound(f"run {run_id!r} not found")

    def discard_run(self, run_id: str) -> None:
        """Remove a run that was never queued (its admission failed after the row was
        written); idempotent."""
        with self._tx() as conn:
            conn.execute(delete(s.runs).where(*self._where(s.runs, id=run_id)))

    def settle_run(
        self, run_id: str, values: RunRecord, *, usage: UsageRecord | None, audit: AuditEntry
    ) -> None:
        """Finish a run in one transaction: the run's final fields (``output`` encrypted), its
        usage record, its audit record."""
        self.apply(self.prepare_settlement(run_id, values, usage=usage, audit=audit))

    def prepare_settlement(
        self,
        run_id: str,
        values: RunRecord,
        *,
        usage: UsageRecord | None,
        audit: AuditEntry,
        attempt: AttemptRecord | None = None,
    ) -> PreparedWrite:
        """The sealed statements of :meth:`settle_run`, for :meth:`apply`.

        Args:
            attempt: for a run a worker executed, how its attempt ended: ``attempt`` (its
                number, see :meth:`start_attempt`), ``outcome``, ``ended_at`` and its
                ``input_tokens``, ``output_tokens``, ``tool_calls``. The attempt is ended
                with the run, and the usage record (``usage["attempt"]``, the same number)
                replaces any record of that attempt (:meth:`interrupt_attempt`'s).
        """
        run_params: AnyRow = {**self._settable(values), "b_id": run_id}
        output = values.get("output")
        if output is not None:
            run_params["output"] = self._sealer.seal("runs.output", run_id, output)
        statements: list[tuple[Any, Mapping[str, Any]]] = [(UPDATE_RUN, run_params)]
        if attempt is not None:
            ended = {k: v for k, v in attempt.items() if k != "attempt"}
            statements.append((END_ATTEMPT, {**ended, "b_run": run_id, "b_attempt": attempt["attempt"]}))
        if usage is not None:
            record: AnyRow = {**usage, "tenant_id": self.tenant_id, "id": new_id("us"), "run_id": run_id}
            insert_usage = INSERT_USAGE if attempt is None else UPSERT_ATTEMPT_USAGE[self._placement.postgres]
            statements.append((insert_usage, {**record, "at": utcnow()}))
        statements.append((INSERT_AUDIT, audit_values(self.tenant_id, **audit)))
        return PreparedWrite(self.tenant_id, tuple(statements))

    # -- attempts of queued runs ------------------------------------------------------

    def start_attempt(self, run_id: str, *, holder: str) -> int:
        """Record that ``holder`` (a worker) starts executing the run now: the run becomes
        ``running`` with ``started_at`` now, and gets its next attempt, open until it ends.
        An earlier attempt still open (its worker died, and the record of that is not
        written yet) is closed as ``interrupted`` (:meth:`interrupt_attempt` still adds
        what it used).

        Returns:
            The attempt's number: 1 for the run's first execution, then 2, 3, ...

        Raises:
            NotFound: no such run.
        """
        a = s.run_attempts
        last_error: AlreadyExists | None = None
        for _ in range(3):  # two workers starting one run at once: the later one numbers again
            now = utcnow()
            try:
                with self._tx() as conn:
                    started = {"status": "running", "started_at": now, "b_id": run_id}
                    if self._exec(conn, UPDATE_RUN, started).rowcount != 1:
                        raise NotFound(f"run {run_id!r} not found")
                    open_ = [*self._where(a, run_id=run_id), a.c.outcome.is_(None)]
                    conn.execute(update(a).where(*open_).values(outcome="interrupted", ended_at=now))
                    last = conn.execute(select(func.max(a.c.attempt)).where(*self._where(a, run_id=run_id)))
                    number = int(last.scalar() or 0) + 1
                    conn.execute(
                        insert(a).values(
                            tenant_id=self.tenant_id,
                            id=new_id("at"),
                            run_id=run_id,
                            attempt=number,
                            holder=holder,
                            started_at=now,
                            ended_at=None,
                            outcome=None,
                            input_tokens=0,
                            output_tokens=0,
                            tool_calls=0,
                        )
                    )
                return number
            except AlreadyExists as err:
                last_error = err
        assert last_error is not None
        raise last_error

    def interrupt_attempt(
        self,
        run_id: str,
        *,
        holder: str,
        input_tokens: int,
        output_tokens: int,
        tool_calls: int,
        audit: AuditEntry,
    ) -> int | None:
        """Record, in one transaction, that ``holder``'s attempt of the run was cut short
        (its lease expired and the run went back to the queue): the attempt ends
        ``interrupted`` with the usage it had recorded (tokens, tool calls), which gets a
        usage record when it used tokens; and ``audit`` is appended (its ``detail`` gains
        the attempt's number). An attempt its worker already ended is left as it is (the
        worker was alive and its record counts everything).

        Returns:
            The attempt's number, or ``None`` when there is none to mark (the worker died
            before it started the run, or already ended it).
        """
        a, r = s.run_attempts, s.runs
        tokens = input_tokens + output_tokens
        with self._tx() as conn:
            latest = conn.execute(
                select(a.c.attempt, a.c.outcome, a.c.started_at)
                .where(*self._where(a, run_id=run_id, holder=holder))
                .order_by(a.c.attempt.desc())
                .limit(1)
            ).first()
            number: int | None = None
            # Closed already by the run's next start (as interrupted, without its usage),
            # or still open: either way it is this holder's attempt whose usage this is.
            if latest is not None and (
                latest.outcome is None or (latest.outcome == "interrupted" and tokens)
            ):
                number = int(latest.attempt)
                now = utcnow()
                ended: AttemptRecord = (
                    {"outcome": "interrupted", "ended_at": now} if latest.outcome is None else {}
                )
                conn.execute(
                    update(a)
                    .where(*self._where(a, run_id=run_id, attempt=number))
                    .where(or_(a.c.outcome.is_(None), a.c.outcome == "interrupted"))
                    .values(
                        **ended, input_tokens=input_tokens, output_tokens=output_tokens, tool_calls=tool_calls
                    )
                )
                run = conn.execute(select(r.c.model, r.c.simulated).where(*self._where(r, id=run_id))).first()
                if tokens and run is not None:
                    record = {
                        "tenant_id": self.tenant_id,
                        "id": new_id("us"),
                        "run_id": run_id,
                        "attempt": number,
                        "at": now,
                        "model": run.model,
                        "simulated": run.simulated,
                        "input_tokens": input_tokens,
                        "output_tokens": output_tokens,
                        "tool_calls": tool_calls,
                        "duration_ms": (now - latest.started_at).total_seconds() * 1000,
                    }
                    conn.execute(UPSERT_ATTEMPT_USAGE[self._placement.postgres], record)
            detail = {**audit.get("detail", {}), "attempt": number}
            entry: AuditEntry = {**audit, "detail": detail}
            conn.execute(INSERT_AUDIT, audit_values(self.tenant_id, **entry))
        return number

    def list_attempts(self, run_ids: list[str]) -> dict[str, list[AttemptRecord]]:
        """The attempts of these runs of this tenant (a foreign or missing id has none),
        per run id, first attempt first."""
        a = s.run_attempts
        found: dict[str, list[AnyRow]] = {run_id: [] for run_id in run_ids}
        if run_ids:
            q = select(a).where(*self._where(a), a.c.run_id.in_(run_ids)).order_by(a.c.run_id, a.c.attempt)
            with self._tx() as conn:
                for row in conn.execute(q).mappings():
                    found[row["run_id"]].append(dict(row))
        return cast(dict[str, list[AttemptRecord]], found)

    # -- key rotation -----------------------------------------------------------------

    def reencrypt(self, progress: Callable[[int, int], None] | None = None, batch: int = 200) -> int:
        """Re-seal every payload of this tenant that is not under its current DEK version
        (the background job after a DEK rotation); see :meth:`BulkRows.reseal`.

        Returns:
            Rows re-sealed.
        """
        return self.bulk().reseal(progress=progress, batch=batch)

    # -- memory (implements patinox.agents.MemoryStore) -------------------------------

    def memory_get(self, key: str) -> str | None:
        """The value under ``key``, or ``None`` (values are stored encrypted; keys are not)."""
        with self._tx() as conn:
            v = conn.execute(select(s.memory.c.value).where(*self._where(s.memory, key=key))).scalar()
        return self._sealer.open("memory.value", key, v)

    def memory_put(self, key: str, value: str) -> None:
        """Set ``key`` to ``value`` (insert or replace). Idempotent: putting the same value
        again leaves the same memory (only ``updated_at`` moves) and the same stored size,
        so a run executed again after its worker died may repeat its writes.

        Raises:
            InvalidRequest: the key is not 1-200 characters, or holds a NUL character (as
                the HTTP route refuses; PostgreSQL cannot store one in text).
            QuotaExceeded: the tenant's stored memory (encrypted size, bytes) would pass its
                ``memory_bytes`` limit (stores made from a tenant context enforce it).
        """
        if not 1 <= len(key) <= 200:
            raise InvalidRequest("memory keys are 1-200 characters", field="key")
        if "\x00" in key:
            raise InvalidRequest("memory keys cannot hold NUL characters", field="key")
        sealed = self._sealer.seal("memory.value", key, value)
        m = s.memory
        with self._tx() as conn:
            if self._memory_limit is not None and self._placement.postgres:
                # Concurrent writers of one tenant take turns, so the total below is exact.
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": self.tenant_id})
            # Write first (on SQLite this takes the write lock), then check the new total;
            # over the quota, the exception rolls the write back.
            n = conn.execute(
                update(m).where(*self._where(m, key=key)).values(value=sealed, updated_at=utcnow())
            ).rowcount
            if n == 0:
                conn.execute(
                    insert(m).values(tenant_id=self.tenant_id, key=key, value=sealed, updated_at=utcnow())
                )
            if self._memory_limit is not None:
                total = int(conn.execute(memory_bytes(conn), {"b_tenant_id": self.tenant_id}).scalar_one())
                if total > self._memory_limit:
                    entry = len(sealed) + len(key.encode("utf-8"))
                    raise QuotaExceeded(
                        f"agent memory would pass its limit of {self._memory_limit} bytes",
                        tenant_id=self.tenant_id,
                        quota="memory_bytes",
                        limit=self._memory_limit,
                        used=total - entry,
                        requested=entry,
                    )

    def memory_delete(self, key: str) -> None:
        """Remove ``key``. Raises :class:`NotFound`."""
        with self._tx() as conn:
            if conn.execute(delete(s.memory).where(*self._where(s.memory, key=key))).rowcount != 1:
                raise NotFound(f"memory key {key!r} not found")

    def memory_list(self, prefix: str = "", limit: int = 100) -> list[str]:
        """Keys starting with ``prefix``, sorted, at most ``limit``."""
        q = select(s.memory.c.key).where(*self._where(s.memory))
        if prefix:
            q = q.where(s.memory.c.key.startswith(prefix, autoescape=True))
        with self._tx() as conn:
            return [str(k) for k in conn.execute(q.order_by(s.memory.c.key).limit(limit)).scalars()]

    # -- audit and usage ------------------------------------------------------------

    def append_audit(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Append one audit record for this tenant."""
        values = audit_values(self.tenant_id, actor, action, target, outcome, detail)
        with self._tx() as conn:
            conn.execute(INSERT_AUDIT, values)
        return values

    def list_audit(self, *, limit: int = 100, after_seq: int = 0) -> list[AuditRecord]:
        """This tenant's audit records, oldest first, after sequence number ``after_seq``.

        ``seq`` is the record's number within this tenant's log (1, 2, ...), not the
        table's counter: on the pool model that counter is shared by every tenant, and its
        gaps would count the neighbours' audited actions. Records are append-only, so a
        record keeps its number.
        """
        q = (
            select(s.audit_log)
            .where(*self._where(s.audit_log))
            .order_by(s.audit_log.c.seq)
            .offset(after_seq)
            .limit(limit)
        )
        with self._tx() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        for number, row in enumerate(rows, start=after_seq + 1):
            row["seq"] = number
        return cast(list[AuditRecord], rows)

    def usage_summary(self, *, since: datetime | None = None) -> list[UsageTotals]:
        """This tenant's usage totals per model since ``since``."""
        with self._tx() as conn:
            q = usage_summary_query(self.tenant_id, since)
            return cast(list[UsageTotals], [dict(r) for r in conn.execute(q).mappings()])

    def list_usage(self, *, since: datetime | None = None, limit: int = 1000) -> list[UsageRecord]:
        """This tenant's usage records since ``since``, oldest first."""
        q = select(s.usage_records).where(*self._where(s.usage_records))
        if since is not None:
            q = q.where(s.usage_records.c.at >= since)
        with self._tx() as conn:
            rows = conn.execute(q.order_by(s.usage_records.c.at).limit(limit)).mappings()
            return cast(list[UsageRecord], [dict(r) for r in rows])

    # -- bulk (export, import, moves) -------------------------------------------------

    def bulk(self) -> _bulk.BulkRows:
        """This tenant's rows in this placement, a table at a time: paged reads (payloads
        opened or as stored), bulk inserts (sealed here or kept), delete-all, counts and
        fingerprints. See :class:`~patinox.storage._bulk.BulkRows`."""
        return _bulk.BulkRows(self._placement, self._tx, self._sealer, tenant_id=self.tenant_id)

    def idempotency(self) -> IdempotencyRecords:
        """This tenant's ``Idempotency-Key`` records (see :class:`IdempotencyRecords`)."""
        return IdempotencyRecords(self._tx, self._sealer, postgres=self._placement.postgres)

    def threads(self) -> ThreadRecords:
        """This tenant's conversation threads and their messages (see :class:`ThreadRecords`)."""
        return ThreadRecords(self._tx, self._sealer)

    def webhooks(self) -> WebhookEndpoints:
        """This tenant's webhook endpoints (see :class:`WebhookEndpoints`)."""
        return WebhookEndpoints(self._tx, self._sealer, self._cache)

    def secrets(self) -> TenantSecrets:
        """This tenant's secrets, sealed under its DEK (see :class:`TenantSecrets`): set,
        rotate, list and delete, and the host-side read of a value (audited)."""
        return TenantSecrets(self._tx, self._sealer)
