"""HTTP response bodies (the OpenAPI schema of the API)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
