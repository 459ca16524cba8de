"""Webhook rows: a tenant's endpoints (:class:`WebhookEndpoints`) and the shared outbox
with its delivery log (:class:`WebhookOutbox`).

Endpoints are tenant data: they live in the tenant's placement beside its agents, every
statement carries the store's ``tenant_id``, and their signing secrets are sealed under
the tenant's DEK (:data:`~patinox.storage._sealer.SEALED_COLUMNS`), so crypto-shredding
makes them unreadable. Made by :meth:`TenantStore.webhooks
<patinox.storage.TenantStore.webhooks>`.

Deliveries (``webhook_deliveries``, one per event and endpoint) and their attempts
(``webhook_attempts``, the delivery log) are control-plane rows of the shared database
whatever the tenant's storage model, like the run queue: delivery loops claim due rows of
every tenant from one table. A claim is a compare-and-set of the row's holder and lease
(:meth:`WebhookOutbox.claim`), so two loops never hold one delivery at once, and a
holder that dies leaves a lease that expires: no delivery is lost. The tenant reads its
log through :meth:`WebhookOutbox.log`, in a transaction bound to its tenant id (on
PostgreSQL row-level security applies to it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, or_, select, update

from patinox.errors import NotFound
from patinox.storage import _schema as s
from patinox.storage._cache import MISS, TenantCache
from patinox.storage._schema import utcnow
from patinox.storage._sealer import Sealer
from patinox.storage._statements import SET_TENANT
from patinox.storage.engine import begin, translate_errors
from patinox.storage.records import AnyRow
from patinox.tenancy import new_id

__all__ = ["ClaimedDelivery", "WebhookEndpoints", "WebhookOutbox"]

_E = s.webhook_endpoints
_D = s.webhook_deliveries
_A = s.webhook_attempts
_SECRET = "webhook_endpoints.secret"
_PREVIOUS = "webhook_endpoints.previous_secret"
#: Columns of an endpoint shown to its tenant (never a secret).
_SHOWN = (
    "id",
    "url",
    "event_types",
    "description",
    "state",
    "consecutive_failures",
    "disabled_at",
    "previous_secret_expires_at",
    "created_at",
    "updated_at",
)
#: The cache of endpoints made without one: disabled, so it holds nothing.
_NO_CACHE = TenantCache(None)

#: Tenant states whose deliveries are not claimed: they wait, pending.
_HELD_STATES = ("suspended", "deleting")

#: A transaction bound to the tenant, or joining the given one (``TenantStore._tx``).
TenantTx = Callable[[Connection | None], AbstractContextManager[Connection]]


def _shown(row: Any) -> AnyRow:
    return {k: row[k] for k in _SHOWN}


class WebhookEndpoints:
    """One tenant's webhook endpoints (see the module docstring). Rows are returned as
    dicts of :data:`_SHOWN` columns; secrets only by :meth:`secrets`."""

    __slots__ = ("_cache", "_sealer", "_tx", "tenant_id")

    def __init__(self, tx: TenantTx, sealer: Sealer, cache: TenantCache | None = None) -> None:
        self._tx = tx
        self._sealer = sealer
        self._cache = cache or _NO_CACHE
        self.tenant_id = sealer.tenant_id

    def _changed(self) -> None:
        """The tenant's active endpoints changed (committed): :meth:`matching` reads again."""
        self._cache.changed(self.tenant_id)

    def create(self, *, url: str, event_types: Sequence[str], description: str, secret: str) -> AnyRow:
        """Insert an active endpoint with ``secret`` (sealed here). Returns it (no secret).

        Raises:
            TenantKeysDestroyed: the tenant was crypto-shredded.
            StorageError: the database failed.
        """
        now = utcnow()
        endpoint_id = new_id("whe")
        row = {
            "tenant_id": self.tenant_id,
            "id": endpoint_id,
            "url": url,
            "event_types": sorted(set(event_types)),
            "description": description,
            "secret": self._sealer.seal(_SECRET, endpoint_id, secret),
            "previous_secret": None,
            "previous_secret_expires_at": None,
            "state": "active",
            "consecutive_failures": 0,
            "disabled_at": None,
            "created_at": now,
            "updated_at": now,
        }
        with self._tx(None) as conn:
            conn.execute(insert(_E).values(row))
        self._changed()
        return _shown(row)

    def all(self) -> list[AnyRow]:
        """The tenant's endpoints, oldest first."""
        q = select(_E).where(_E.c.tenant_id == self.tenant_id).order_by(_E.c.id)
        with self._tx(None) as conn:
            return [_shown(r) for r in conn.execute(q).mappings()]

    def get(self, endpoint_id: str) -> AnyRow:
        """One endpoint. Raises :class:`NotFound` (also for another tenant's id)."""
        with self._tx(None) as conn:
            return _shown(self._row(conn, endpoint_id))

    def delete(self, endpoint_id: str) -> AnyRow:
        """Remove an endpoint; returns it as it was. Raises :class:`NotFound`."""
        with self._tx(None) as conn:
            row = _shown(self._row(conn, endpoint_id))
            conn.execute(delete(_E).where(*self._key(endpoint_id)))
        self._changed()
        return row

    def rotate(self, endpoint_id: str, secret: str, *, overlap_until: datetime | None) -> AnyRow:
        """Make ``secret`` the endpoint's signing secret; the current one keeps signing
        beside it until ``overlap_until`` (``None``: it stops now). Returns the endpoint.

        Raises:
            NotFound: no such endpoint of this tenant.
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        with self._tx(None) as conn:
            row = self._row(conn, endpoint_id)
            old = self._sealer.open(_SECRET, endpoint_id, row["secret"])
            values: dict[str, Any] = {
                "secret": self._sealer.seal(_SECRET, endpoint_id, secret),
                "previous_secret": None,
                "previous_secret_expires_at": None,
                "updated_at": utcnow(),
            }
            if overlap_until is not None and old is not None:
                values["previous_secret"] = self._sealer.seal(_PREVIOUS, endpoint_id, old)
                values["previous_secret_expires_at"] = overlap_until
            conn.execute(update(_E).where(*self._key(endpoint_id)).values(values))
            return _shown({**row, **values})

    def secrets(self, endpoint_id: str, *, now: datetime | None = None) -> tuple[AnyRow, list[str]]:
        """The endpoint and the secrets that sign its deliveries now: the current one,
        then the previous one while its overlap lasts.

        Raises:
            NotFound: no such endpoint of this tenant.
            DecryptionFailed, TenantKeysDestroyed: a secret cannot be opened.
        """
        now = now or utcnow()
        with self._tx(None) as conn:
            row = self._row(conn, endpoint_id)
        found = [self._sealer.open(_SECRET, endpoint_id, row["secret"]) or ""]
        until = row["previous_secret_expires_at"]
        if row["previous_secret"] is not None and until is not None and until > now:
            found.append(self._sealer.open(_PREVIOUS, endpoint_id, row["previous_secret"]) or "")
        return _shown(row), found

    def matching(self, event_type: str, conn: Connection | None = None) -> list[str]:
        """Ids of the active endpoints that receive ``event_type``, in ``conn`` when given
        (a transaction this store may join: see :meth:`TenantStore.joins`).

        Every settlement asks, so the tenant's active endpoints are served from the
        control-plane cache (:mod:`patinox.storage._cache`) when nothing changed since they
        were read: a tenant without endpoints costs its runs no query. Creating, deleting,
        enabling or disabling an endpoint empties it (:meth:`_changed`). On PostgreSQL, where
        the cache is off, every settlement still reads them."""
        key = ("webhooks.active", self.tenant_id)
        seen = self._cache.epoch()
        active: tuple[tuple[str, tuple[str, ...]], ...] = self._cache.get(key)
        if active is MISS:
            q = select(_E.c.id, _E.c.event_types).where(
                _E.c.tenant_id == self.tenant_id, _E.c.state == "active"
            )
            with self._tx(conn) as c:
                active = tuple((r.id, tuple(r.event_types or ())) for r in c.execute(q.order_by(_E.c.id)))
            self._cache.put(self.tenant_id, key, active, seen)
        return [endpoint_id for endpoint_id, types in active if event_type in types]

    def record_attempt(self, endpoint_id: str, *, ok: bool, disable_after: int) -> bool:
        """Count an attempt's outcome: a success clears the endpoint's consecutive failures,
        a failure adds one and disables the endpoint at ``disable_after``. Returns True
        when this call disabled it.

        Raises:
            StorageError: the database failed.
        """
        with self._tx(None) as conn:
            if ok:
                conn.execute(update(_E).where(*self._key(endpoint_id)).values(consecutive_failures=0))
                return False
            conn.execute(
                update(_E)
                .where(*self._key(endpoint_id))
                .values(consecutive_failures=_E.c.consecutive_failures + 1)
            )
            now = utcnow()
            done = conn.execute(
                update(_E)
                .where(
                    *self._key(endpoint_id),
                    _E.c.state == "active",
                    _E.c.consecutive_failures >= disable_after,
                )
                .values(state="disabled", disabled_at=now, updated_at=now)
            ).rowcount
        if done:
            self._changed()
        return bool(done)

    def enable(self, endpoint_id: str) -> AnyRow:
        """Make a disabled endpoint active again, its failure count cleared.

        Raises:
            NotFound: no such endpoint of this tenant.
        """
        with self._tx(None) as conn:
            row = self._row(conn, endpoint_id)
            values = {
                "state": "active",
                "consecutive_failures": 0,
                "disabled_at": None,
                "updated_at": utcnow(),
            }
            conn.execute(update(_E).where(*self._key(endpoint_id)).values(values))
        self._changed()
        return _shown({**row, **values})

    def _key(self, endpoint_id: str) -> tuple[Any, Any]:
        return (_E.c.tenant_id == self.tenant_id, _E.c.id == endpoint_id)

    def _row(self, conn: Connection, endpoint_id: str) -> Any:
        row = conn.execute(select(_E).where(*self._key(endpoint_id))).mappings().first()
        if row is None:
            raise NotFound(f"webhook endpoint {endpoint_id!r} not found")
        return row


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedDelivery:
    """A delivery a loop holds (see :meth:`WebhookOutbox.claim`): its row's fields, and
    ``attempt``, the number of the attempt about to be made (1, 2, ...)."""

    tenant_id: str
    id: str
    endpoint_id: str
    event_type: str
    run_id: str | None
    created_at: datetime
    attempt: int
    holder: str


class WebhookOutbox:
    """The shared outbox and delivery log (see the module docstring).

    Args:
        control_tx: a control-plane transaction of the shared database, or the caller's
            (``SqlBackend.control_tx``).
        engine: the shared database, for transactions bound to one tenant.
    """

    def __init__(self, control_tx: Callable[..., AbstractContextManager[Connection]], engine: Engine) -> None:
        self._control_tx = control_tx
        self._engine = engine

    def enqueue(
        self,
        tenant_id: str,
        endpoint_ids: Sequence[str],
        event_type: str,
        *,
        run_id: str | None,
        conn: Connection | None = None,
    ) -> list[str]:
        """One pending delivery of ``event_type`` per endpoint, due now; in ``conn`` when
        given (a settlement's transaction). Returns the delivery ids.

        Raises:
            StorageError: the database failed.
        """
        if not endpoint_ids:
            return []
        now = utcnow()
        rows = [
            {
                "tenant_id": tenant_id,
                "id": new_id("whd"),
                "endpoint_id": endpoint_id,
                "event_type": event_type,
                "run_id": run_id,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "claimed_by": None,
                "lease_until": None,
                "created_at": now,
                "finished_at": None,
            }
            for endpoint_id in endpoint_ids
        ]
        with self._control_tx(conn) as c:
            c.execute(insert(_D), rows)
        return [str(r["id"]) for r in rows]

    def claim(
        self, holder: str, *, lease_s: float, limit: int = 16, now: datetime | None = None
    ) -> list[ClaimedDelivery]:
        """Take up to ``limit`` due deliveries (pending, next attempt at or before ``now``,
        unheld or held under an expired lease), oldest due first, each by a conditional
        UPDATE: a row another loop took meanwhile is passed over, never taken twice.

        Raises:
            StorageError: the database failed.
        """
        now = now or utcnow()
        free = or_(_D.c.lease_until.is_(None), _D.c.lease_until < now)
        # A suspended tenant's deliveries wait, pending, until it is resumed (a deleting
        # one's until its rows are purged); a deleted tenant's are claimed and dropped.
        held = select(s.tenants.c.id).where(s.tenants.c.state.in_(_HELD_STATES))
        due = (
            select(_D)
            .where(_D.c.state == "pending", _D.c.next_attempt_at <= now, free, _D.c.tenant_id.not_in(held))
            .order_by(_D.c.next_attempt_at)
            .limit(limit)
        )
        until = now + timedelta(seconds=lease_s)
        taken: list[ClaimedDelivery] = []
        with self._control_tx() as conn:
            candidates = list(conn.execute(due).mappings())
        for row in candidates:
            with self._control_tx() as conn:
                won = conn.execute(
                    update(_D)
                    .where(
                        _D.c.tenant_id == row["tenant_id"],
                        _D.c.id == row["id"],
                        _D.c.state == "pending",
                        _D.c.attempts == row["attempts"],
                        free,
                    )
                    .values(claimed_by=holder, lease_until=until)
                ).rowcount
            if won == 1:
                taken.append(
                    ClaimedDelivery(
                        tenant_id=row["tenant_id"],
                        id=row["id"],
                        endpoint_id=row["endpoint_id"],
                        event_type=row["event_type"],
                        run_id=row["run_id"],
                        created_at=row["created_at"],
                        attempt=int(row["attempts"]) + 1,
                        holder=holder,
                    )
                )
        return taken

    def record(
        self,
        delivery: ClaimedDelivery,
        *,
        at: datetime,
        status_code: int | None,
        error: str | None,
        duration_ms: float,
        state: str,
        next_attempt_at: datetime | None = None,
    ) -> bool:
        """Log one attempt of a claimed delivery and move the delivery on: ``state``
        ``pending`` (again at ``next_attempt_at``), ``succeeded`` or ``failed``; the claim
        is released. Both in one transaction, and only while the delivery is still this
        holder's claim at this attempt. Returns whether it was.

        Raises:
            StorageError: the database failed.
        """
        now = utcnow()
        with self._control_tx() as conn:
            moved = conn.execute(
                update(_D)
                .where(
                    _D.c.tenant_id == delivery.tenant_id,
                    _D.c.id == delivery.id,
                    _D.c.claimed_by == delivery.holder,
                    _D.c.attempts == delivery.attempt - 1,
                )
                .values(
                    attempts=delivery.attempt,
                    state=state,
                    next_attempt_at=next_attempt_at or now,
                    claimed_by=None,
                    lease_until=None,
                    finished_at=None if state == "pending" else now,
                )
            ).rowcount
            if moved != 1:
                return False
            conn.execute(
                insert(_A).values(
                    tenant_id=delivery.tenant_id,
                    id=new_id("wha"),
                    delivery_id=delivery.id,
                    endpoint_id=delivery.endpoint_id,
                    event_type=delivery.event_type,
                    attempt=delivery.attempt,
                    at=at,
                    status_code=status_code,
                    error=None if error is None else error[:500],
                    duration_ms=duration_ms,
                )
            )
        return True

    def release(self, delivery: ClaimedDelivery) -> bool:
        """Give a claimed delivery back unattempted (its tenant was suspended since the
        claim): pending as before, unheld, its attempt not counted. Returns whether it was
        still this holder's claim."""
        with self._control_tx() as conn:
            return bool(
                conn.execute(
                    update(_D)
                    .where(
                        _D.c.tenant_id == delivery.tenant_id,
                        _D.c.id == delivery.id,
                        _D.c.claimed_by == delivery.holder,
                        _D.c.attempts == delivery.attempt - 1,
                    )
                    .values(claimed_by=None, lease_until=None)
                ).rowcount
            )

    def drop(self, delivery: ClaimedDelivery, reason: str) -> None:
        """End a claimed delivery without an attempt (its tenant, endpoint or run is gone,
        or the endpoint is disabled): ``failed``, with ``reason`` in the log.

        Raises:
            StorageError: the database failed.
        """
        self.record(
            delivery,
            at=utcnow(),
            status_code=None,
            error=reason,
            duration_ms=0.0,
            state="failed",
        )

    def purge_finished(self, before: datetime) -> int:
        """Delete, for every tenant, the deliveries that finished before ``before`` and the
        log entries of attempts made before it (retention). Returns rows deleted.

        Raises:
            StorageError: the database failed.
        """
        with self._control_tx() as conn:
            gone = conn.execute(delete(_D).where(_D.c.state != "pending", _D.c.finished_at < before)).rowcount
            gone += conn.execute(delete(_A).where(_A.c.at < before)).rowcount
        return int(gone)

    # -- the tenant's reads and deletes (bound to its tenant id) ------------------------

    @contextmanager
    def _tenant_tx(self, tenant_id: str) -> Iterator[Connection]:
        with translate_errors(), begin(self._engine) as conn:
            if self._engine.dialect.name == "postgresql":
                conn.execute(SET_TENANT, {"tenant_id": tenant_id})
            yield conn

    def log(
        self, tenant_id: str, endpoint_id: str, *, limit: int = 50, before: str | None = None
    ) -> list[AnyRow]:
        """The attempts of ``tenant_id``'s endpoint ``endpoint_id``, newest first, at most
        ``limit``, older than the attempt id ``before`` when given. Each: ``id``,
        ``delivery_id``, ``event_type``, ``attempt``, ``at`` (UTC), ``status_code`` (or
        ``None``), ``error`` (or ``None``), ``duration_ms`` (milliseconds)."""
        q = select(
            _A.c.id,
            _A.c.delivery_id,
            _A.c.event_type,
            _A.c.attempt,
            _A.c.at,
            _A.c.status_code,
            _A.c.error,
            _A.c.duration_ms,
        ).where(_A.c.tenant_id == tenant_id, _A.c.endpoint_id == endpoint_id)
        if before is not None:
            q = q.where(_A.c.id < before)
        with self._tenant_tx(tenant_id) as conn:
            return [dict(r) for r in conn.execute(q.order_by(_A.c.id.desc()).limit(limit)).mappings()]

    def deliveries(self, tenant_id: str, endpoint_id: str) -> list[AnyRow]:
        """``tenant_id``'s deliveries to ``endpoint_id``, oldest first (id, event_type,
        run_id, state, attempts, next_attempt_at, created_at, finished_at)."""
        q = select(
            _D.c.id,
            _D.c.event_type,
            _D.c.run_id,
            _D.c.state,
            _D.c.attempts,
            _D.c.next_attempt_at,
            _D.c.created_at,
            _D.c.finished_at,
        ).where(_D.c.tenant_id == tenant_id, _D.c.endpoint_id == endpoint_id)
        with self._tenant_tx(tenant_id) as conn:
            return [dict(r) for r in conn.execute(q.order_by(_D.c.id)).mappings()]

    def forget_endpoint(self, tenant_id: str, endpoint_id: str) -> None:
        """Delete the deliveries and the log of ``tenant_id``'s endpoint ``endpoint_id``
        (it was deleted)."""
        with self._tenant_tx(tenant_id) as conn:
            for table in (_D, _A):
                conn.execute(
                    delete(table).where(table.c.tenant_id == tenant_id, table.c.endpoint_id == endpoint_id)
                )
