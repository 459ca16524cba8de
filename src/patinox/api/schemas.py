"""HTTP response bodies (the OpenAPI schema of the API), and the timestamp parameters take."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_TIMESTAMP_FORM = (
    "an ISO 8601 date-time with an offset, e.g. 2025-01-31T00:00:00Z or 2025-01-31T01:00:00+01:00"
)


def _utc_timestamp(value: object) -> datetime:
    """``value`` (ISO 8601 text with an explicit offset) as a UTC datetime.

    Raises:
        ValueError: not such text (a number, a date alone, no offset), or its UTC time
            falls outside years 1-9999, the range every storage engine stores alike.
    """
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"give {_TIMESTAMP_FORM}") from None
    elif isinstance(value, datetime):
        parsed = value
    else:
        raise ValueError(f"give {_TIMESTAMP_FORM}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"the offset is missing: give {_TIMESTAMP_FORM}")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range: its UTC time must lie in years 1-9999") from None


#: A timestamp parameter (e.g. ``since``): ISO 8601 with an offset (``Z`` or ``+HH:MM``),
#: read as UTC; a Unix time, a date alone or a time without offset is refused (422).
Timestamp = Annotated[datetime, BeforeValidator(_utc_timestamp)]


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorBody(_Out):
    code: str = Field(description="stable machine-readable code, e.g. not_found, rate_limited")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorOut(_Out):
    error: ErrorBody


class DependencyOut(_Out):
    status: str = Field(description="ok | failing | disabled (not used by this deployment)")
    error: str | None = Field(
        default=None, description="when failing: the error's type, `timeout` or `not_running`"
    )


class ReadinessOut(_Out):
    status: str = Field(description="ready | not_ready")
    checks: dict[str, DependencyOut] = Field(description="database, limit_store and workers")


class KeyOut(_Out):
    id: str
    tenant_id: str | None
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None = None
    expires_at: datetime | None = Field(default=None, description="when it stops working; null: never")
    last_used_at: datetime | None = Field(
        default=None, description="its last use, to the minute (recorded once a minute at most); null: never"
    )


class IssuedKeyOut(KeyOut):
    key: str = Field(description="the secret API key; shown this once, store it now")


class AgentOut(_Out):
    id: str
    name: str
    instructions: str
    model: str
    simulated: bool = Field(description="true when the model is Patinox's simulated LLM")
    tools: list[str]
    max_output_tokens: int | None
    max_tool_calls: int | None
    created_at: datetime
    updated_at: datetime


class AttemptOut(_Out):
    attempt: int = Field(description="1 for the run's first execution, then 2, 3, ...")
    holder: str | None = Field(
        default=None,
        description="the worker that ran it (worker:<host>:<pid>); null for a synchronous run, "
        "which runs once in the API process that admitted it",
    )
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = Field(
        default=None,
        description="null while it runs; then succeeded | failed | cancelled | interrupted "
        "(its worker died or stalled past its lease, and the run went back to the queue)",
    )
    input_tokens: int = Field(description="model input tokens this attempt used, tokens")
    output_tokens: int = Field(description="model output tokens this attempt used, tokens")
    tool_calls: int


class RunOut(_Out):
    id: str
    agent_id: str
    mode: str
    status: str = Field(description="queued | running | succeeded | failed")
    input: str
    output: str | None = None
    model: str
    simulated: bool
    requested_output_tokens: int | None = None
    input_tokens: int = Field(description="model input tokens used, tokens")
    output_tokens: int = Field(description="model output tokens used, tokens")
    tool_calls: int
    error: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = Field(default=None, description="execution wall time, milliseconds")
    attempts: int = Field(
        default=0,
        description="times the run was executed: a queued run whose worker died runs again "
        "(at-least-once execution); 0 while it waits",
    )
    attempt_history: list[AttemptOut] = Field(
        default_factory=list, description="each execution, first first; the run's tokens are its last's"
    )


class MemoryItemOut(_Out):
    key: str
    value: str


class MemoryPut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(max_length=1_000_000)


class AuditOut(_Out):
    seq: int
    id: str
    tenant_id: str | None
    at: datetime
    actor: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any]


class UsageRecordOut(_Out):
    id: str
    run_id: str
    attempt: int | None = Field(
        default=None,
        description="the execution of the run it meters (see attempt_history); at most one record each",
    )
    at: datetime
    model: str
    simulated: bool
    input_tokens: int
    output_tokens: int
    tool_calls: int
    duration_ms: float


class UsageSummaryOut(_Out):
    tenant_id: str
    model: str
    simulated: bool
    runs: int
    input_tokens: int
    output_tokens: int
    tool_calls: int


class TenantUsageOut(_Out):
    tokens_today: int = Field(description="tokens (in + out) settled today (UTC), tokens")
    tokens_reserved: int = Field(description="tokens held by runs in flight, tokens")
    tokens_per_day: int
    runs_in_flight: int
    records: list[UsageRecordOut]


class MeOut(_Out):
    tenant_id: str
    key_id: str
    scopes: list[str]
    plan: str
    isolation_level: str
    limits: dict[str, Any]
