"""What the client returns: typed views of the HTTP API's JSON (field names and meanings as
in the server's OpenAPI schema at ``/openapi.json``; a test holds them to it). Fields the
server adds later are kept (``extra="allow"``) and reachable as attributes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Agent",
    "Attempt",
    "AuditEntry",
    "Endpoint",
    "IssuedKey",
    "Key",
    "Me",
    "MemoryItem",
    "Run",
    "Secret",
    "Setting",
    "Tenant",
    "TenantConfig",
    "TenantUsage",
    "Thread",
    "ThreadMessage",
    "ThreadRun",
    "UsageRecord",
    "UsageSummary",
    "Webhook",
    "WebhookAttempt",
    "WebhookPing",
    "WebhookWithSecret",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Tenant(_Model):
    """A tenant (operator routes)."""

    id: str
    name: str
    plan: str
    state: str = Field(description="active | suspended | deleted")
    isolation_level: str
    storage_model: str
    limit_overrides: dict[str, Any]
    limits: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None


class Key(_Model):
    """An API key, without its secret."""

    id: str
    tenant_id: str | None
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None = None
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class IssuedKey(Key):
    """A key just created: ``key`` is the secret, shown this once."""

    key: str


class Agent(_Model):
    id: str
    name: str
    instructions: str
    model: str
    simulated: bool
    tools: list[str]
    max_output_tokens: int | None
    max_tool_calls: int | None
    created_at: datetime
    updated_at: datetime


class Attempt(_Model):
    """One execution of a run."""

    attempt: int
    holder: str | None = None
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = None
    input_tokens: int
    output_tokens: int
    tool_calls: int


class Run(_Model):
    """A run: ``status`` is ``queued``, ``running``, ``succeeded`` or ``failed``; tokens in
    tokens, ``duration_ms`` in milliseconds."""

    id: str
    agent_id: str
    mode: str
    status: str
    input: str
    output: str | None = None
    model: str
    simulated: bool
    requested_output_tokens: int | None = None
    input_tokens: int
    output_tokens: int
    tool_calls: int
    error: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    attempts: int = 0
    attempt_history: list[Attempt] = Field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether the run ended (succeeded or failed)."""
        return self.status not in ("queued", "running")


class MemoryItem(_Model):
    key: str
    value: str


class Secret(_Model):
    """A tenant's secret as the API describes it: never its value."""

    name: str
    version: int
    created_at: datetime
    updated_at: datetime


class AuditEntry(_Model):
    seq: int
    id: str
    tenant_id: str | None
    at: datetime
    actor: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any]


class UsageRecord(_Model):
    id: str
    run_id: str
    attempt: int | None = None
    at: datetime
    model: str
    simulated: bool
    input_tokens: int
    output_tokens: int
    tool_calls: int
    duration_ms: float


class UsageSummary(_Model):
    """One tenant's usage of one model (operator route)."""

    tenant_id: str
    model: str
    simulated: bool
    runs: int
    input_tokens: int
    output_tokens: int
    tool_calls: int


class TenantUsage(_Model):
    """The calling tenant's usage: tokens today (UTC), held by runs in flight, its daily
    budget, runs in flight, and its usage records."""

    tokens_today: int
    tokens_reserved: int
    tokens_per_day: int
    runs_in_flight: int
    records: list[UsageRecord]


class Me(_Model):
    """The calling key's tenant, scopes, plan, isolation level and effective limits."""

    tenant_id: str
    key_id: str
    scopes: list[str]
    plan: str
    isolation_level: str
    limits: dict[str, Any]


class Setting(_Model):
    """A setting's effective value and its layer: ``default`` < ``plan`` < ``tenant``."""

    value: Any
    source: str
    description: str | None = None


class TenantConfig(_Model):
    """A tenant's settings with their layers (``GET /v1/config``)."""

    tenant_id: str
    plan: str
    isolation_level: Setting
    storage_model: Setting
    limits: dict[str, Setting]


class Thread(_Model):
    """A conversation thread: ``messages`` is how many it holds now (at most the plan's
    ``max_thread_messages``); ``updated_at`` moves when a run adds messages."""

    id: str
    metadata: dict[str, str]
    messages: int
    created_at: datetime
    updated_at: datetime


class ThreadMessage(_Model):
    """One message of a thread: ``role`` is ``user`` (a run's input) or ``assistant`` (the
    agent's reply); ``position`` counts 1, 2, ... within the thread."""

    id: str
    thread_id: str
    position: int
    role: str
    content: str
    run_id: str | None
    created_at: datetime


class ThreadRun(_Model):
    """A run on a thread: the finished run and the two messages it appended."""

    thread_id: str
    run: Run
    messages: list[ThreadMessage]


class Webhook(_Model):
    """A webhook endpoint of the tenant, without its signing secret."""

    id: str
    url: str
    event_types: list[str]
    description: str
    state: str = Field(description="active | disabled (after consecutive failed attempts)")
    consecutive_failures: int
    disabled_at: datetime | None = None
    previous_secret_expires_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class WebhookWithSecret(Webhook):
    """An endpoint just registered or rotated: ``secret`` (``whsec_...``), shown this once."""

    secret: str


class WebhookPing(_Model):
    """A queued test delivery: its ``webhook-id``."""

    delivery_id: str


class WebhookAttempt(_Model):
    """One attempt to deliver an event (the endpoint's delivery log)."""

    id: str
    delivery_id: str
    event_type: str
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: float


class Endpoint(_Model):
    """Where a tenant is reached (``GET /v1/endpoint``): its ``slug``, custom ``domains``,
    every host name (``hosts``; empty when the deployment has no ``base_domain``)."""

    tenant_id: str
    slug: str | None
    domains: list[str]
    hosts: list[str]
    base_domain: str | None
