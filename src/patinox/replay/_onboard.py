"""Onboarding a trace's sources: one tenant, API key and agent per source, through the
admin and tenant APIs of a running server."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from patinox.errors import ConfigurationError, OperationFailed

_PLANS: frozenset[str] = frozenset({"free", "pro", "enterprise"})
_KEY_SCOPES = ["agents:write", "runs:write", "read"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TenantHandle:
    """What the replay needs to act as one source's tenant.

    Attributes:
        source: trace source name, e.g. ``"azure-code"``.
        tenant_id: id the server gave the tenant.
        plan: the tenant's plan (``free``, ``pro`` or ``enterprise``).
        key: the tenant API key secret (left out of ``repr``).
        agent_id: the agent every run of this source uses.
        model: the agent's model id (``"simulated"`` is the offline simulated model).
    """

    source: str
    tenant_id: str
    plan: str
    key: str = field(repr=False)
    agent_id: str
    model: str


def error_of(response: httpx.Response) -> tuple[str, str]:
    """(code, message) of an error response; ``http_<status>`` when the body has none."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = error.get("code")
        if isinstance(code, str) and code:
            return code, str(error.get("message", ""))
    return f"http_{response.status_code}", response.text[:200]


def _created(response: httpx.Response, step: str, source: str) -> dict[str, Any]:
    """The JSON body of a ``201 Created``.

    Raises:
        OperationFailed: any other answer (fields: step, source, status_code, error_code).
    """
    if response.status_code == httpx.codes.CREATED:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            return body
    code, message = error_of(response)
    raise OperationFailed(
        f"onboarding {source!r}: {step} answered HTTP {response.status_code} {code}: {message}",
        step=step,
        source=source,
        status_code=response.status_code,
        error_code=code,
    )


async def _onboard_one(
    admin: httpx.AsyncClient, source: str, plan: str, *, model: str, name_prefix: str
) -> TenantHandle:
    name = f"{name_prefix}{source}"
    tenant = _created(
        await admin.post("/admin/tenants", json={"name": name, "plan": plan}),
        "create tenant",
        source,
    )
    tenant_id: str = tenant["id"]
    key_body = _created(
        await admin.post(
            f"/admin/tenants/{tenant_id}/keys",
            json={"name": f"replay-{source}", "scopes": list(_KEY_SCOPES)},
        ),
        "create key",
        source,
    )
    secret = key_body.get("key")
    if not isinstance(secret, str) or not secret:
        raise OperationFailed(
            f"onboarding {source!r}: create key returned no secret",
            step="create key",
            source=source,
        )
    agent = _created(
        await admin.post(
            "/v1/agents",
            headers={"Authorization": f"Bearer {secret}"},
            json={
                "name": f"replay-{source}",
                "instructions": f"Replay agent for trace source {source}.",
                "model": model,
                "tools": [],
            },
        ),
        "create agent",
        source,
    )
    return TenantHandle(
        source=source, tenant_id=tenant_id, plan=plan, key=secret, agent_id=agent["id"], model=model
    )


async def onboard(
    base_url: str,
    admin_key: str,
    sources: Mapping[str, str],
    *,
    model: str,
    name_prefix: str,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout_s: float = 30.0,
) -> dict[str, TenantHandle]:
    """Create a tenant, an API key and one agent per trace source.

    Sources are onboarded concurrently. Nothing is rolled back when one fails: tenants
    already created stay (named ``<name_prefix><source>``), so use a fresh prefix per run.

    Args:
        base_url: server root, e.g. ``"http://127.0.0.1:8000"``.
        admin_key: an operator API key.
        sources: source name -> plan (``free``, ``pro`` or ``enterprise``).
        model: model id of every agent, e.g. ``"simulated"``.
        name_prefix: tenant names are ``<name_prefix><source>``.
        transport: an httpx transport to use instead of the network (tests).
        timeout_s: per-request timeout, seconds.

    Returns:
        Source name -> :class:`TenantHandle`.

    Raises:
        ConfigurationError: an unknown plan.
        OperationFailed: the server refused a step (the message names source, step,
            status and error code).
        httpx.TransportError: the server could not be reached.
    """
    bad = {s: p for s, p in sources.items() if p not in _PLANS}
    if bad:
        raise ConfigurationError(f"unknown plan(s) {bad}; plans are {sorted(_PLANS)}")
    async with httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        timeout=timeout_s,
        headers={"Authorization": f"Bearer {admin_key}"},
    ) as admin:
        handles = await asyncio.gather(
            *(_onboard_one(admin, s, p, model=model, name_prefix=name_prefix) for s, p in sources.items())
        )
    return {h.source: h for h in handles}
