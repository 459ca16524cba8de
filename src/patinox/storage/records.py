"""Typed records: the rows the stores hand to the layers above, as TypedDicts.

A TypedDict is a plain ``dict`` at run time (no conversion per row on the hot path); the
type checker holds every layer to the columns of ``storage/_schema.py``. Sealed columns
(``runs.input``, ``runs.output``, ``memory.value``) appear here opened, as text: the
stores open them before a record leaves storage and seal them on the way in.

Records that cross a process boundary travel as data (JSON-safe dicts or pydantic models
at that boundary), never as these dicts' Python objects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypedDict


class TenantRecord(TypedDict):
    """One row of ``tenants`` (the control plane)."""

    id: str
    name: str
    plan: str
    state: str  #: a :class:`patinox.tenancy.TenantState` value
    isolation_level: str
    storage_model: str
    limit_overrides: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    keys_destroyed_at: datetime | None
    moving_to: str | None


class ApiKeyRecord(TypedDict):
    """One row of ``api_keys``; ``tenant_id`` is ``None`` for an operator key."""

    id: str
    tenant_id: str | None
    name: str
    prefix: str
    secret_hash: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


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


class AuditRecord(TypedDict, total=False):
    """One row of ``audit_log``; ``tenant_id`` is ``None`` for the operator's own entries."""

    seq: int
    tenant_id: str | None
    id: str
    at: datetime
    actor: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any]
