"""The relational schema (SQLAlchemy Core).

Every tenant-owned table carries ``tenant_id`` as the first column of its primary key
(Citus-compatible: the tenant id leads every key). Tables without ``tenant_id`` are
control-plane tables (tenants, api_keys, operator audit lives in ``audit_log`` with a
NULL tenant id). Deletion discovers tenant tables from the database catalog, not from a
hand-kept list (see :meth:`patinox.storage.SqlBackend.purge_tenant`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from patinox.storage._fast import sqlite_datetime_binder


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        """On SQLite, with the speed-ups on (:func:`~patinox.storage._fast.sqlite_datetime_binder`),
        one step to the text SQLAlchemy's ``DATETIME`` stores; elsewhere, and with them off,
        :meth:`process_bind_param` then the dialect's own processor, as usual."""
        if dialect.name == "sqlite":
            binder = sqlite_datetime_binder(self.impl_instance.dialect_impl(dialect))
            if binder is not None:
                return binder
        return super().bind_processor(dialect)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    }
)

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("plan", String(40), nullable=False),
    Column("state", String(20), nullable=False),
    Column("isolation_level", String(20), nullable=False),
    Column("storage_model", String(10), nullable=False, server_default="pool"),
    Column("limit_overrides", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime(), nullable=True),
    # Set when the tenant's DEKs are destroyed (crypto-shredding); no DEK is made after.
    Column("keys_destroyed_at", UTCDateTime(), nullable=True),
    # Set while the tenant moves to another storage model: reads go on, writes are held.
    Column("moving_to", String(10), nullable=True),
    # A live tenant's name is unique; a deleted tenant keeps its row (a tombstone, so
    # its id is never reused) but frees its name.
    Index(
        "uq_tenants_live_name",
        "name",
        unique=True,
        sqlite_where=text("state != 'deleted'"),
        postgresql_where=text("state != 'deleted'"),
    ),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    # NULL for operator keys; tenant keys are deleted with their tenant.
    Column("tenant_id", String(40), nullable=True, index=True),
    Column("name", String(100), nullable=False),
    Column("prefix", String(24), nullable=False, unique=True),
    Column("secret_hash", String(64), nullable=False),
    Column("scopes", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    # NULL: the key does not expire. Rotation sets the old key's to the end of the overlap.
    Column("expires_at", UTCDateTime(), nullable=True),
    # Written at most once a minute per key and process, without emptying any cache.
    Column("last_used_at", UTCDateTime(), nullable=True),
)

agents = Table(
    "agents",
    metadata,
    Column("tenant_id", String(40), primary_key=True),
    Column("id", String(40), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("instructions", Text, nullable=False),
    Column("model", String(200), nullable=False),
    Column("tools", JSON, nullable=False),
    Column("max_output_tokens", Integer, nullable=True),
    Column("max_tool_calls", Integer, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index("uq_agents_tenant_id_name", "tenant_id", "name", unique=True),
)

runs = Table(
    "runs",
    metadata,
    Column("tenant_id", String(40), primary_key=True),
    Column("id", String(40), primary_key=True),
    Column("agent_id", String(40), nullable=False),
    Column("principal", String(40), nullable=False),
    Column("mode", String(10), nullable=False),
    Column("status", String(20), nullable=False),
    # Sealed payloads (AES-256-GCM blobs, patinox.storage._crypto.aead), stored as bytes.
    Column("input", LargeBinary, nullable=False),
    Column("requested_output_tokens", Integer, nullable=True),
    Column("output", LargeBinary, nullable=True),
    Column("model", String(200), nullable=False),
    Column("simulated", Integer, nullable=False),
    Column("input_tokens", Integer, nullable=False, default=0),
    Column("output_tokens", Integer, nullable=False, default=0),
    Column("tool_calls", Integer, nullable=False, default=0),
    Column("error", JSON, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("duration_ms", Float, nullable=True),
    ForeignKeyConstraint(["tenant_id", "agent_id"], ["agents.tenant_id", "agents.id"], ondelete="CASCADE"),
    Index("ix_runs_tenant_id_created_at", "tenant_id", "created_at"),
)

memory = Table(
    "memory",
    metadata,
    Column("tenant_id", String(40), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("value", LargeBinary, nullable=False),  # sealed, like runs.input
    Column("updated_at", UTCDateTime(), nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    # NULL for operator-level records (e.g. the deletion of a tenant, kept after its data).
    Column("tenant_id", String(40), nullable=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("actor", String(40), nullable=False),
    Column("action", String(60), nullable=False),
    Column("target", String(200), nullable=True),
    Column("outcome", String(20), nullable=False),
    Column("detail", JSON, nullable=False),
    Index("ix_audit_log_tenant_id_seq", "tenant_id", "seq"),
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("tenant_id", String(40), primary_key=True),
    Column("id", String(40), primary_key=True),
    Column("run_id", String(40), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("model", String(200), nullable=False),
    Column("simulated", Integer, nullable=False),
    Column("input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("tool_calls", Integer, nullable=False),
    Column("duration_ms", Float, nullable=False),
    # The run's execution this record meters (1, 2, ... see run_attempts); NULL on records
    # written before attempts were numbered. A queued run's attempt has at most one record.
    Column("attempt", Integer, nullable=True),
    # CPU time and peak memory of the run's execution process (seconds, bytes); NULL where
    # nothing measured them (the namespace level shares one process; older records).
    Column("cpu_seconds", Float, nullable=True),
    Column("peak_memory_bytes", BigInteger().with_variant(Integer(), "sqlite"), nullable=True),
    Index("ix_usage_records_tenant_id_at", "tenant_id", "at"),
    Index("uq_usage_records_tenant_id_run_id_attempt", "tenant_id", "run_id", "attempt", unique=True),
)

run_attempts = Table(
    "run_attempts",
    metadata,
    # One row per execution of a queued run by a worker: a run put back in the queue after
    # its worker died runs again, as attempt 2, 3, ... Lives beside the run, in the
    # tenant's placement. A synchronous run has none (it runs once, in the API process).
    Column("tenant_id", String(40), primary_key=True),
    Column("id", String(40), primary_key=True),
    Column("run_id", String(40), nullable=False),
    Column("attempt", Integer, nullable=False),
    # The worker that ran it (its claim's holder, ``worker:<host>:<pid>``).
    Column("holder", String(80), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("ended_at", UTCDateTime(), nullable=True),
    # NULL while it runs; then succeeded | failed | cancelled | interrupted.
    Column("outcome", String(20), nullable=True),
    # Tokens and tool calls the attempt used (for an interrupted one: what its worker had
    # recorded before it died).
    Column("input_tokens", Integer, nullable=False, default=0),
    Column("output_tokens", Integer, nullable=False, default=0),
    Column("tool_calls", Integer, nullable=False, default=0),
    ForeignKeyConstraint(["tenant_id", "run_id"], ["runs.tenant_id", "runs.id"], ondelete="CASCADE"),
    Index("uq_run_attempts_tenant_id_run_id_attempt", "tenant_id", "run_id", "attempt", unique=True),
)

tenant_keys = Table(
    "tenant_keys",
    metadata,
    Column("tenant_id", String(40), primary_key=True),
    Column("version", Integer, primary_key=True),
    # A DEK wrapped by the KEK (patinox.storage.crypto.WrappedKey bytes); never the DEK itself.
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

run_queue = Table(
    "run_queue",
    metadata,
    # Asynchronous runs waiting for (or held by) a worker; the run row itself lives in the
    # tenant's placement. Ordered by (priority desc, finish_tag): weighted fair queueing.
    Column("tenant_id", String(40), primary_key=True),
    Column("run_id", String(40), primary_key=True),
    Column("priority", Integer, nullable=False),
    Column("finish_tag", Float, nullable=False),
    # The tenant's concurrent-run cap when enqueued: claims never take more of its runs.
    Column("max_running", Integer, nullable=False),
    # Tokens reserved against the daily budget at admission, settled by whoever runs it.
    Column("reserved_tokens", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    Column("quota_period", String(20), nullable=False),
    Column("enqueued_at", UTCDateTime(), nullable=False),
    Column("claimed_by", String(80), nullable=True),
    Column("lease_until", UTCDateTime(), nullable=True),
    # Usage of the holder's attempt not yet spent in the token ledger, written after each
    # model response while it runs: what the reaper charges if the holder dies.
    Column(
        "used_input_tokens", BigInteger().with_variant(Integer, "sqlite"), nullable=False, server_default="0"
    ),
    Column(
        "used_output_tokens", BigInteger().with_variant(Integer, "sqlite"), nullable=False, server_default="0"
    ),
    Column("used_tool_calls", Integer, nullable=False, server_default="0"),
    # Set when the run's tenant asked to cancel it while it ran (POST /v1/runs/{id}/cancel
    # answered by another process than the one running it): the process holding the run
    # polls for it (RunService.watch_tenants) and cancels the run there.
    # (A server default, even NULL, keeps it out of the columns a hold's row is written with.)
    Column("cancel_requested_at", UTCDateTime(), nullable=True, server_default=text("NULL")),
    Index("ix_run_queue_pick", "claimed_by", "priority", "finish_tag"),
)

queue_tenants = Table(
    "queue_tenants",
    metadata,
    # Per-tenant state of the fair queue: the virtual finish tag of its newest entry.
    Column("tenant_id", String(40), primary_key=True),
    Column("last_tag", Float, nullable=False),
)

quota_ledger = Table(
    "quota_ledger",
    metadata,
    # Durable per-tenant, per-period counters: spent and reserved (reserve-then-settle),
    # updated with conditional UPDATEs so several API processes never overbook.
    Column("tenant_id", String(40), primary_key=True),
    Column("quota", String(40), primary_key=True),
    Column("period", String(20), primary_key=True),
    Column("spent", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    Column("reserved", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
)

queue_clock = Table(
    "queue_clock",
    metadata,
    # The queue's virtual time: the finish tag of the entry dispatched last (one row).
    Column("id", Integer, primary_key=True),
    Column("virtual_time", Float, nullable=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    # One row per Idempotency-Key header a tenant sent on a POST that creates something
    # (draft-ietf-httpapi-idempotency-key-header): the request's fingerprint and, once the
    # first request finished, its response. Lives beside the tenant's other rows, in its
    # placement; the key is unique per tenant (the primary key), which is what makes N
    # concurrent requests with one key create exactly one resource.
    Column("tenant_id", String(40), primary_key=True),
    Column("key", String(255), primary_key=True),
    # SHA-256 (hex) of the method, the route and the request body.
    Column("fingerprint", String(64), nullable=False),
    # in_progress | done
    Column("state", String(20), nullable=False),
    Column("response_status", Integer, nullable=True),
    # The first response's JSON body, sealed like runs.output (AAD: idempotency_keys.response).
    Column("response", LargeBinary, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    # After this the key may be used again for another request (24 h after created_at).
    Column("expires_at", UTCDateTime(), nullable=False),
    Index("ix_idempotency_keys_tenant_id_expires_at", "tenant_id", "expires_at"),
)

threads = Table(
    "threads",
    metadata,
    # A tenant's conversation thread: the messages of its runs, passed to the model as
    # message history on each run on the thread (see patinox.storage._threads).
    Column("tenant_id", String(40), primary_key=True),
    Column("id", String(40), primary_key=True),
    # The caller's metadata (a small string map) as JSON, sealed (AAD: threads.metadata).
    Column("metadata", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index("ix_threads_tenant_id_created_at", "tenant_id", "created_at"),
)

thread_messages = Table(
    "thread_messages",
    metadata,
    # One message of a thread: the user's input or the agent's reply of a run on it.
    Column("tenant_id", String(40), primary_key=True),
    Column("id", String(40), primary_key=True),
    Column("thread_id", String(40), nullable=False),
    # The message's place in its thread (1, 2, ...; gaps where the oldest were dropped).
    Column("position", Integer, nullable=False),
    # user | assistant
    Column("role", String(20), nullable=False),
    # Sealed like runs.input (AAD: thread_messages.content, the message id).
    Column("content", LargeBinary, nullable=False),
    # The run that added it.
    Column("run_id", String(40), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    ForeignKeyConstraint(["tenant_id", "thread_id"], ["threads.tenant_id", "threads.id"], ondelete="CASCADE"),
    Index(
        "uq_thread_messages_tenant_id_thread_id_position", "tenant_id", "thread_id", "position", unique=True
    ),
)

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    # A tenant's HTTPS receiver of run events. Tenant data: lives in the tenant's placement
    # (pool tables, bridge schema, silo database), carried by export, import and moves.
    Column("tenant_id", String(40), primary_key=True),
    Column("id", String(40), primary_key=True),
    Column("url", String(2048), nullable=False),
    # The event types it receives (``run.succeeded``, ``run.failed``, ``run.cancelled``).
    Column("event_types", JSON, nullable=False),
    Column("description", String(200), nullable=False, server_default=""),
    # The signing secret (``whsec_<base64>``), sealed like runs.input (AAD:
    # webhook_endpoints.secret); during a rotation's overlap the previous one too.
    Column("secret", LargeBinary, nullable=False),
    Column("previous_secret", LargeBinary, nullable=True),
    Column("previous_secret_expires_at", UTCDateTime(), nullable=True),
    # active | disabled (after ``disable_after`` consecutive failed attempts).
    Column("state", String(20), nullable=False),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    Column("disabled_at", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

secrets = Table(
    "secrets",
    metadata,
    # A tenant's named secrets (a provider key for BYOK, a token a tool sends): the value
    # sealed like runs.output (AAD: secrets.value and the name), never returned by the API.
    # Lives beside the tenant's other rows, in its placement.
    Column("tenant_id", String(40), primary_key=True),
    Column("name", String(100), primary_key=True),
    Column("value", LargeBinary, nullable=False),
    # 1 when first set, +1 on each rotation.
    Column("version", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    # The outbox: one row per event and endpoint, in the shared database (control plane,
    # like run_queue) whatever the tenant's storage model, so delivery loops claim due rows
    # of every tenant from one table. The body is not stored: it is made from the run's
    # record (sealed in the tenant's placement) when sent.
    Column("tenant_id", String(40), primary_key=True),
    Column("id", String(40), primary_key=True),
    Column("endpoint_id", String(40), nullable=False),
    Column("event_type", String(40), nullable=False),
    # The run the event is about (NULL for webhook.ping).
    Column("run_id", String(40), nullable=True),
    # pending | succeeded | failed (attempts exhausted, endpoint gone or disabled)
    Column("state", String(20), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    # The delivery loop holding it while it sends (a crashed holder's lease expires).
    Column("claimed_by", String(80), nullable=True),
    Column("lease_until", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    Index("ix_webhook_deliveries_tenant_id_endpoint_id", "tenant_id", "endpoint_id"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    # The delivery log: one row per attempt to send a delivery (control plane, beside
    # webhook_deliveries). Read by the tenant per endpoint, newest first.
    Column("tenant_id", String(40), primary_key=True),
    Column("id", String(40), primary_key=True),
    Column("delivery_id", String(40), nullable=False),
    Column("endpoint_id", String(40), nullable=False),
    Column("event_type", String(40), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    # The receiver's HTTP status, or NULL with ``error`` when no answer came.
    Column("status_code", Integer, nullable=True),
    Column("error", String(500), nullable=True),
    Column("duration_ms", Float, nullable=False),
    Index("ix_webhook_attempts_tenant_id_endpoint_id_at", "tenant_id", "endpoint_id", "at"),
)

#: Tables holding tenant-owned rows, all keyed by ``tenant_id`` (used for checks; deletion
#: reads the live catalog instead).
TENANT_TABLES = (
    agents,
    runs,
    memory,
    usage_records,
    run_attempts,
    idempotency_keys,
    audit_log,
    api_keys,
    tenant_keys,
    run_queue,
    queue_tenants,
    quota_ledger,
    threads,
    thread_messages,
    webhook_endpoints,
    webhook_deliveries,
    webhook_attempts,
    secrets,
)

tenant_hosts = Table(
    "tenant_hosts",
    metadata,
    # The host names a tenant is reached at: its slug (``<slug>.<base domain>``, kind
    # ``slug``, the bare label stored) and custom domains the operator gave it (kind
    # ``domain``, the full name), IDNA-encoded and lower case. A control-plane table: the
    # owner column is not named ``tenant_id`` so that deleting the tenant (which purges
    # every table with such a column) keeps the row, which holds the name back from other
    # tenants for the quarantine (released_at, or the owner's deleted_at, plus the
    # quarantine).
    Column("name", String(253), primary_key=True),
    Column("owner_id", String(40), nullable=False),
    Column("kind", String(10), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # Set when the operator took the name from its tenant; NULL while in use.
    Column("released_at", UTCDateTime(), nullable=True),
    Index("ix_tenant_hosts_owner_id", "owner_id"),
)
