"""Every request the client makes, described once (method, path, body, how to read the
answer) for both :class:`~patinox.client.Client` and :class:`~patinox.client.AsyncClient`,
and the server's errors as the package's exceptions."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter

from patinox.client.models import (
    Agent,
    AuditEntry,
    Endpoint,
    IssuedKey,
    Key,
    Me,
    MemoryItem,
    Run,
    Secret,
    Tenant,
    TenantConfig,
    TenantUsage,
    Thread,
    ThreadMessage,
    ThreadRun,
    UsageSummary,
    Webhook,
    WebhookAttempt,
    WebhookPing,
    WebhookWithSecret,
)
from patinox.errors import ServerError, error_for

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request and how to read its answer (``read`` gets a 2xx response)."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


def _idem(key: str | None) -> dict[str, str]:
    """The ``Idempotency-Key`` header: a retry with the same key and body gets the first
    answer back and creates nothing (keys are per tenant and kept 24 h)."""
    return {} if key is None else {"Idempotency-Key": key}


def raise_for(response: httpx.Response) -> None:
    """Raise the package's exception for a non-2xx answer (:func:`patinox.errors.error_for`:
    the class with the server's ``code``, its ``details`` as fields, ``retry_after_s`` from
    ``Retry-After``).

    Raises:
        PatinoxError: a subclass for the server's ``code``; :class:`ServerError` when the
            answer is not the API's error shape.
    """
    if response.is_success:
        return
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
        details = dict(body.get("details") or {})
    except (ValueError, KeyError, TypeError):
        raise ServerError(
            f"HTTP {response.status_code}: {response.text[:200]}",
            code="http_error",
            http_status=response.status_code,
        ) from None
    retry = response.headers.get("retry-after")
    if retry is not None and "retry_after_s" not in details:
        with contextlib.suppress(ValueError):
            details["retry_after_s"] = float(retry)
    raise error_for(code, message, details, response.status_code)


def _one(model: type[M]) -> Callable[[httpx.Response], M]:
    def read(response: httpx.Response) -> M:
        return model.model_validate_json(response.content)

    return read


def _many(model: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]

    def read(response: httpx.Response) -> list[M]:
        return list(adapter.validate_json(response.content))

    return read


def _nothing(response: httpx.Response) -> None:
    return None


def _object(response: httpx.Response) -> dict[str, Any]:
    return dict(response.json())


def _seg(value: str) -> str:
    """A path segment (ids and memory keys may hold any character)."""
    return quote(value, safe="")


def _given(**values: Any) -> dict[str, Any]:
    """The arguments the caller gave (``None``: not given; the server's default holds)."""
    return {k: v for k, v in values.items() if v is not None}


def next_before(response: httpx.Response) -> str | None:
    """The ``before`` cursor of the ``Link: <...>; rel="next"`` header, if a page follows."""
    link = response.links.get("next")
    if not link:
        return None
    before = httpx.URL(link["url"]).params.get("before")
    return None if before is None else str(before)


# --- the calling tenant's resources ---------------------------------------------------


def me() -> Call[Me]:
    return Call("GET", "/v1/me", _one(Me))


def create_agent(
    name: str,
    *,
    model: str | None,
    instructions: str | None,
    tools: list[str] | None,
    max_output_tokens: int | None,
    max_tool_calls: int | None,
    idempotency_key: str | None = None,
) -> Call[Agent]:
    body = _given(
        name=name,
        model=model,
        instructions=instructions,
        tools=tools,
        max_output_tokens=max_output_tokens,
        max_tool_calls=max_tool_calls,
    )
    return Call("POST", "/v1/agents", _one(Agent), json=body, headers=_idem(idempotency_key))


def list_agents() -> Call[list[Agent]]:
    return Call("GET", "/v1/agents", _many(Agent))


def get_agent(agent_id: str) -> Call[Agent]:
    return Call("GET", f"/v1/agents/{_seg(agent_id)}", _one(Agent))


def update_agent(agent_id: str, changes: Mapping[str, Any]) -> Call[Agent]:
    return Call("PATCH", f"/v1/agents/{_seg(agent_id)}", _one(Agent), json=dict(changes))


def delete_agent(agent_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/agents/{_seg(agent_id)}", _nothing)


def start_run(
    agent_id: str, prompt: str, *, output_tokens: int | None, mode: str, idempotency_key: str | None = None
) -> Call[Run]:
    body = _given(input=prompt, output_tokens=output_tokens, mode=mode)
    return Call(
        "POST", f"/v1/agents/{_seg(agent_id)}/runs", _one(Run), json=body, headers=_idem(idempotency_key)
    )


def cancel_run(run_id: str) -> Call[Run]:
    return Call("POST", f"/v1/runs/{_seg(run_id)}/cancel", _one(Run))


def get_run(run_id: str) -> Call[Run]:
    return Call("GET", f"/v1/runs/{_seg(run_id)}", _one(Run))


def list_runs(*, agent_id: str | None, limit: int, before: str | None) -> Call[httpx.Response]:
    """One page of runs (read with :func:`runs_page`)."""
    params = _given(agent_id=agent_id, limit=limit, before=before)
    return Call("GET", "/v1/runs", lambda r: r, params=params)


def runs_page(response: httpx.Response) -> tuple[list[Run], str | None]:
    """A page of runs and the cursor of the next (``None``: the last page)."""
    return _many(Run)(response), next_before(response)


def get_memory(key: str) -> Call[MemoryItem]:
    return Call("GET", f"/v1/memory/{_seg(key)}", _one(MemoryItem))


def put_memory(key: str, value: str) -> Call[MemoryItem]:
    return Call("PUT", f"/v1/memory/{_seg(key)}", _one(MemoryItem), json={"value": value})


def delete_memory(key: str) -> Call[None]:
    return Call("DELETE", f"/v1/memory/{_seg(key)}", _nothing)


def put_secret(name: str, value: str) -> Call[Secret]:
    return Call("PUT", f"/v1/secrets/{_seg(name)}", _one(Secret), json={"value": value})


def list_secrets() -> Call[list[Secret]]:
    return Call("GET", "/v1/secrets", _many(Secret))


def delete_secret(name: str) -> Call[None]:
    return Call("DELETE", f"/v1/secrets/{_seg(name)}", _nothing)


def _strings(response: httpx.Response) -> list[str]:
    return [str(x) for x in response.json()]


def list_memory(prefix: str, limit: int) -> Call[list[str]]:
    return Call("GET", "/v1/memory", _strings, params={"prefix": prefix, "limit": limit})


def config() -> Call[TenantConfig]:
    return Call("GET", "/v1/config", _one(TenantConfig))


def tenant_config(tenant_id: str) -> Call[TenantConfig]:
    return Call("GET", f"/admin/tenants/{_seg(tenant_id)}/config", _one(TenantConfig))


def endpoint() -> Call[Endpoint]:
    return Call("GET", "/v1/endpoint", _one(Endpoint))


def tenant_endpoint(tenant_id: str) -> Call[Endpoint]:
    return Call("GET", f"/admin/tenants/{_seg(tenant_id)}/endpoint", _one(Endpoint))


def set_tenant_endpoint(tenant_id: str, slug: str | None, domains: Sequence[str] | None) -> Call[Endpoint]:
    body: dict[str, Any] = {}
    if slug is not None:
        body["slug"] = slug
    if domains is not None:
        body["domains"] = list(domains)
    return Call("PUT", f"/admin/tenants/{_seg(tenant_id)}/endpoint", _one(Endpoint), json=body)


def usage(since: str | None) -> Call[TenantUsage]:
    return Call("GET", "/v1/usage", _one(TenantUsage), params=_given(since=since))


def audit(*, after_seq: int, limit: int) -> Call[list[AuditEntry]]:
    return Call("GET", "/v1/audit", _many(AuditEntry), params={"after_seq": after_seq, "limit": limit})


# --- operator routes ------------------------------------------------------------------


def create_tenant(
    name: str,
    *,
    plan: str | None,
    isolation_level: str | None,
    storage_model: str | None,
    limits: Mapping[str, Any] | None,
) -> Call[Tenant]:
    body = _given(
        name=name,
        plan=plan,
        isolation_level=isolation_level,
        storage_model=storage_model,
        limits=None if limits is None else dict(limits),
    )
    return Call("POST", "/admin/tenants", _one(Tenant), json=body)


def list_tenants(include_deleted: bool) -> Call[list[Tenant]]:
    params = {"include_deleted": "true"} if include_deleted else {}
    return Call("GET", "/admin/tenants", _many(Tenant), params=params)


def get_tenant(tenant_id: str) -> Call[Tenant]:
    return Call("GET", f"/admin/tenants/{_seg(tenant_id)}", _one(Tenant))


def update_tenant(tenant_id: str, changes: Mapping[str, Any]) -> Call[Tenant]:
    return Call("PATCH", f"/admin/tenants/{_seg(tenant_id)}", _one(Tenant), json=dict(changes))


def tenant_action(tenant_id: str, action: str) -> Call[Tenant]:
    return Call("POST", f"/admin/tenants/{_seg(tenant_id)}/{action}", _one(Tenant))


def delete_tenant(tenant_id: str) -> Call[dict[str, Any]]:
    return Call("DELETE", f"/admin/tenants/{_seg(tenant_id)}", _object)


def _keys(tenant_id: str | None) -> str:
    """Where a tenant's keys are: the operator's route, or the tenant's own (``None``)."""
    return "/v1/keys" if tenant_id is None else f"/admin/tenants/{_seg(tenant_id)}/keys"


def create_key(
    tenant_id: str | None, name: str, scopes: list[str] | None, expires_at: datetime | None
) -> Call[IssuedKey]:
    body = _given(name=name, scopes=scopes, expires_at=None if expires_at is None else expires_at.isoformat())
    return Call("POST", _keys(tenant_id), _one(IssuedKey), json=body)


def list_keys(tenant_id: str | None) -> Call[list[Key]]:
    return Call("GET", _keys(tenant_id), _many(Key))


def rotate_key(
    tenant_id: str | None, key_id: str, overlap_s: float, expires_at: datetime | None
) -> Call[IssuedKey]:
    body = _given(overlap_s=overlap_s, expires_at=None if expires_at is None else expires_at.isoformat())
    return Call("POST", f"{_keys(tenant_id)}/{_seg(key_id)}/rotate", _one(IssuedKey), json=body)


def revoke_key(tenant_id: str | None, key_id: str) -> Call[Key]:
    return Call("DELETE", f"{_keys(tenant_id)}/{_seg(key_id)}", _one(Key))


def usage_summary(tenant_id: str | None, since: str | None) -> Call[list[UsageSummary]]:
    return Call("GET", "/admin/usage", _many(UsageSummary), params=_given(tenant_id=tenant_id, since=since))


def operator_audit(tenant_id: str | None, *, after_seq: int, limit: int) -> Call[list[AuditEntry]]:
    params = _given(tenant_id=tenant_id, after_seq=after_seq, limit=limit)
    return Call("GET", "/admin/audit", _many(AuditEntry), params=params)


def create_webhook(
    url: str, event_types: list[str], description: str, idempotency_key: str | None
) -> Call[WebhookWithSecret]:
    body = {"url": url, "event_types": event_types, "description": description}
    return Call("POST", "/v1/webhooks", _one(WebhookWithSecret), json=body, headers=_idem(idempotency_key))


def list_webhooks() -> Call[list[Webhook]]:
    return Call("GET", "/v1/webhooks", _many(Webhook))


def get_webhook(endpoint_id: str) -> Call[Webhook]:
    return Call("GET", f"/v1/webhooks/{_seg(endpoint_id)}", _one(Webhook))


def delete_webhook(endpoint_id: str) -> Call[Webhook]:
    return Call("DELETE", f"/v1/webhooks/{_seg(endpoint_id)}", _one(Webhook))


def rotate_webhook(endpoint_id: str, overlap_s: float) -> Call[WebhookWithSecret]:
    path = f"/v1/webhooks/{_seg(endpoint_id)}/rotate"
    return Call("POST", path, _one(WebhookWithSecret), json={"overlap_s": overlap_s})


def enable_webhook(endpoint_id: str) -> Call[Webhook]:
    return Call("POST", f"/v1/webhooks/{_seg(endpoint_id)}/enable", _one(Webhook))


def ping_webhook(endpoint_id: str) -> Call[WebhookPing]:
    return Call("POST", f"/v1/webhooks/{_seg(endpoint_id)}/ping", _one(WebhookPing))


def webhook_attempts(endpoint_id: str, limit: int, before: str | None) -> Call[list[WebhookAttempt]]:
    path = f"/v1/webhooks/{_seg(endpoint_id)}/deliveries"
    return Call("GET", path, _many(WebhookAttempt), params=_given(limit=limit, before=before))


def poll_delay(poll_s: float, waited_s: float, timeout_s: float | None) -> float:
    """Seconds to sleep before the next poll of a queued run (never past the timeout)."""
    if timeout_s is None or math.isinf(timeout_s):
        return poll_s
    return max(0.0, min(poll_s, timeout_s - waited_s))


# --- conversation threads ----------------------------------------------------------------


def create_thread(metadata: Mapping[str, str] | None, idempotency_key: str | None = None) -> Call[Thread]:
    body = _given(metadata=None if metadata is None else dict(metadata))
    return Call("POST", "/v1/threads", _one(Thread), json=body, headers=_idem(idempotency_key))


def get_thread(thread_id: str) -> Call[Thread]:
    return Call("GET", f"/v1/threads/{_seg(thread_id)}", _one(Thread))


def delete_thread(thread_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/threads/{_seg(thread_id)}", _nothing)


def list_threads(*, limit: int, before: str | None) -> Call[httpx.Response]:
    """One page of threads (read with :func:`threads_page`)."""
    return Call("GET", "/v1/threads", lambda r: r, params=_given(limit=limit, before=before))


def threads_page(response: httpx.Response) -> tuple[list[Thread], str | None]:
    """A page of threads and the cursor of the next (``None``: the last page)."""
    return _many(Thread)(response), next_before(response)


def list_messages(thread_id: str, *, limit: int, after: str | None) -> Call[httpx.Response]:
    """One page of a thread's messages (read with :func:`messages_page`)."""
    params = _given(limit=limit, after=after)
    return Call("GET", f"/v1/threads/{_seg(thread_id)}/messages", lambda r: r, params=params)


def messages_page(response: httpx.Response) -> tuple[list[ThreadMessage], str | None]:
    """A page of messages and the ``after`` cursor of the next (``None``: the last page)."""
    link = response.links.get("next")
    after = httpx.URL(link["url"]).params.get("after") if link else None
    return _many(ThreadMessage)(response), None if after is None else str(after)


def run_on_thread(
    thread_id: str,
    agent_id: str,
    prompt: str,
    *,
    output_tokens: int | None,
    idempotency_key: str | None = None,
) -> Call[ThreadRun]:
    body = _given(agent_id=agent_id, input=prompt, output_tokens=output_tokens)
    path = f"/v1/threads/{_seg(thread_id)}/runs"
    return Call("POST", path, _one(ThreadRun), json=body, headers=_idem(idempotency_key))
