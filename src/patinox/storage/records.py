"""Typed records: the rows the stores hand to the layers above, as TypedDicts.

A TypedDict is a plain ``dict`` at run time (no conversion per row on the hot path); the
type checker holds every layer to the columns of ``storage/_schema.py``. Sealed columns
(``runs.input``, ``runs.output``, ``memory.value``) appear here opened, as text: the
stores open them before a record leaves storage and seal them on the way in.

Records that cross a process boundary travel as data (JSON-safe dicts or pydantic models
at that boundary), never as these dicts' Python objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NotRequired, TypedDict

#: The columns to set in an update of one row (column name to value): a partial record
#: whose columns the caller chooses (``update_agent``, ``update_tenant``, a tenant's
#: compare-and-set). Runs, whose record is not total, are updated with a :class:`RunRecord`.
Changes = dict[str, Any]

#: A row of any table, column name to value: for code that walks every table alike
#: (export and import bundles, bulk pages, statement parameters).
AnyRow = dict[str, Any]


class KeyTenantRecord(TypedDict):
    """The columns of a ``tenants`` row that a key lookup reads beside the key
    (:meth:`SqlBackend.find_api_key <patinox.storage.SqlBackend.find_api_key>`): what a
    :class:`~patinox.tenancy.TenantContext` is built from."""

    id: str
    plan: str
    state: str  #: a :class:`patinox.tenancy.TenantState` value
    isolation_level: str
    storage_model: str
    limit_overrides: dict[str, Any]
    moving_to: str | None


class TenantRecord(KeyTenantRecord):
    """One row of ``tenants`` (the control plane)."""

    name: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    keys_destroyed_at: datetime | None


class ApiKeyRecord(TypedDict):
    """One row of ``api_keys`` without its secret hash, as listings and revocation show it;
    ``tenant_id`` is ``None`` for an operator key."""

    id: str
    tenant_id: str | None
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None  #: ``None``: it does not expire
    last_used_at: datetime | None  #: to the minute; ``None``: never used


class StoredApiKeyRecord(ApiKeyRecord):
    """One row of ``api_keys`` as stored: with the SHA-256 (hex) of the whole key."""

    secret_hash: str


class AgentRecord(TypedDict):
    """One row of ``agents``."""

    tenant_id: str
    id: str
    name: str
    instructions: str
    model: str
    tools: list[str]
    max_output_tokens: int | None
    max_tool_calls: int | None
    created_at: datetime
    updated_at: datetime


class RunRecord(TypedDict, total=False):
    """One row of ``runs``, ``input`` and ``output`` opened.

    Not total: a run is read back whole, but is built up in steps (created ``queued`` or
    ``running``, then settled), and the layers above pass the partial record along.
    """

    tenant_id: str
    id: str
    agent_id: str
    principal: str
    mode: str  #: ``sync`` or ``async``
    status: str  #: ``queued``, ``running``, ``succeeded``, ``failed``, ``cancelled``
    input: str
    requested_output_tokens: int | None
    output: str | None
    model: str
    simulated: int  #: 0 or 1
    input_tokens: int
    output_tokens: int
    tool_calls: int
    error: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: float | None


class AttemptRecord(TypedDict, total=False):
    """One row of ``run_attempts``: one execution of a queued run by a worker.

    Not total: a settlement ends an attempt with some of its columns (``attempt``,
    ``outcome``, ``ended_at`` and its usage).
    """

    tenant_id: str
    id: str
    run_id: str
    attempt: int
    holder: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None  #: ``None`` while it runs; then ``succeeded``, ``failed``, ...
    input_tokens: int
    output_tokens: int
    tool_calls: int


class UsageRecord(TypedDict, total=False):
    """One row of ``usage_records``: what one run (attempt) was charged."""

    tenant_id: str
    id: str
    run_id: str
    at: datetime
    model: str
    simulated: int
    input_tokens: int
    output_tokens: int
    tool_calls: int
    duration_ms: float
    attempt: int | None
    cpu_seconds: float | None  #: CPU time of the run's execution process, seconds (None: not measured)
    peak_memory_bytes: int | None  #: its peak memory, bytes (None: not measured)


class AuditRecord(TypedDict, total=False):
    """One row of ``audit_log``; ``tenant_id`` is ``None`` for the operator's own entries."""

    seq: int  #: the record's number within its tenant's log (1, 2, ...)
    tenant_id: str | None
    id: str
    at: datetime
    actor: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any]


class AuditEntry(TypedDict):
    """An audit record as a caller asks for it to be appended (the store adds the
    tenant, a fresh id and the time)."""

    actor: str
    action: str
    target: str | None
    outcome: str
    detail: NotRequired[Mapping[str, Any]]


class UsageTotals(TypedDict):
    """Usage totals of one tenant, model and simulated flag (a usage summary's row);
    tokens, tool calls, and runs (not records: a run executed again has one per attempt)."""

    tenant_id: str
    model: str
    simulated: int
    runs: int
    input_tokens: int
    output_tokens: int
    tool_calls: int
