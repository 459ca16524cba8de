"""The asyncio client: :class:`AsyncClient` (see :mod:`patinox.client`); the same
methods as :class:`~patinox.client.Client`, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import httpx

from patinox.client import _requests as rq
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

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient:
    """An asyncio client of one Patinox deployment, as one key (a tenant key for the
    tenant's resources, the operator key for :attr:`admin`).

    Args:
        base_url: the deployment, e.g. ``http://127.0.0.1:8000``.
        api_key: the key (``ptx_...``), sent as ``Authorization: Bearer``.
        timeout_s: per request, seconds (a synchronous run lasts as long as the run).
        max_connections: connections kept to the server at most.
        transport: an httpx transport of your own (e.g. ``httpx.MockTransport`` in your
            tests, or one with retries).
        headers: sent with every request.

    Every method raises the package's exception for the server's error ``code``
    (:mod:`patinox.errors`: ``RateLimited``, ``QuotaExceeded``, ``NotFound``...), with the
    error's details as fields and ``retry_after_s`` from ``Retry-After``. Use it as an
    async context manager, or :meth:`aclose` it.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 120.0,
        max_connections: int = 20,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={**(headers or {}), "Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )
        self.agents = Agents(self)
        self.runs = Runs(self)
        self.memory = Memory(self)
        self.secrets = Secrets(self)
        self.keys = Keys(self, operator=False)
        self.webhooks = Webhooks(self)
        self.admin = Admin(self)
        self.threads = Threads(self)

    async def send(self, call: rq.Call[T]) -> T:
        """Make one request (see :mod:`patinox.client._requests`) and read its answer.

        Raises:
            PatinoxError: the server's error, as the package's exception.
            httpx.TransportError: the server could not be reached.
        """
        response = await self._http.request(
            call.method, call.path, json=call.json, params=call.params, headers=call.headers
        )
        rq.raise_for(response)
        return call.read(response)

    async def me(self) -> Me:
        """The calling key: its tenant, scopes, plan, isolation level and limits."""
        return await self.send(rq.me())

    async def config(self) -> TenantConfig:
        """The tenant's settings, each with its effective value and layer."""
        return await self.send(rq.config())

    async def endpoint(self) -> Endpoint:
        """Where the tenant is reached: its slug, custom domains and host names."""
        return await self.send(rq.endpoint())

    async def usage(self, since: str | None = None) -> TenantUsage:
        """The tenant's tokens today, reserved and budgeted, and its usage records since
        ``since`` (ISO 8601; default: today, UTC)."""
        return await self.send(rq.usage(since))

    async def audit(self, *, after_seq: int = 0, limit: int = 100) -> list[AuditEntry]:
        """The tenant's audit entries after ``after_seq``, oldest first."""
        return await self.send(rq.audit(after_seq=after_seq, limit=limit))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


class Agents:
    """The tenant's agents (``client.agents``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
        self,
        name: str,
        *,
        model: str | None = None,
        instructions: str | None = None,
        tools: list[str] | None = None,
        max_output_tokens: int | None = None,
        max_tool_calls: int | None = None,
        idempotency_key: str | None = None,
    ) -> Agent:
        return await self._c.send(
            rq.create_agent(
                name,
                model=model,
                instructions=instructions,
                tools=tools,
                max_output_tokens=max_output_tokens,
                max_tool_calls=max_tool_calls,
                idempotency_key=idempotency_key,
            )
        )

    async def list(self) -> list[Agent]:
        return await self._c.send(rq.list_agents())

    async def get(self, agent_id: str) -> Agent:
        return await self._c.send(rq.get_agent(agent_id))

    async def update(self, agent_id: str, **changes: Any) -> Agent:
        return await self._c.send(rq.update_agent(agent_id, changes))

    async def delete(self, agent_id: str) -> None:
        await self._c.send(rq.delete_agent(agent_id))


class Runs:
    """The tenant's runs (``client.runs``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
        self,
        agent_id: str,
        prompt: str,
        *,
        output_tokens: int | None = None,
        idempotency_key: str | None = None,
    ) -> Run:
        """Run the agent and wait for its end (a synchronous run).

        Raises:
            RunFailed: the run failed (its ``run_id`` among the fields).
        """
        return await self._c.send(
            rq.start_run(
                agent_id, prompt, output_tokens=output_tokens, mode="sync", idempotency_key=idempotency_key
            )
        )

    async def submit(
        self,
        agent_id: str,
        prompt: str,
        *,
        output_tokens: int | None = None,
        idempotency_key: str | None = None,
    ) -> Run:
        """Queue a run (an asynchronous run) and return it at once, ``queued``. With an
        ``idempotency_key``, a retry of the same request returns the first run."""
        return await self._c.send(
            rq.start_run(
                agent_id, prompt, output_tokens=output_tokens, mode="async", idempotency_key=idempotency_key
            )
        )

    async def cancel(self, run_id: str) -> Run:
        """Cancel a queued or running run, wherever it runs; returns it (``failed`` with
        reason ``cancelled`` once stopped, charged what it used).

        Raises:
            RunFinished: the run had already ended (409 ``run_finished``).
        """
        return await self._c.send(rq.cancel_run(run_id))

    async def wait(self, run_id: str, *, timeout_s: float | None = None, poll_s: float = 0.25) -> Run:
        """Poll the run until it ends; returns it (``succeeded`` or ``failed``).

        Raises:
            TimeoutError: it had not ended after ``timeout_s`` seconds (it goes on).
        """
        started = time.monotonic()
        while True:
            run = await self.get(run_id)
            waited = time.monotonic() - started
            if run.finished:
                return run
            if timeout_s is not None and waited >= timeout_s:
                raise TimeoutError(f"run {run_id} did not finish within {timeout_s} s (it goes on)")
            await asyncio.sleep(rq.poll_delay(poll_s, waited, timeout_s))

    async def get(self, run_id: str) -> Run:
        return await self._c.send(rq.get_run(run_id))

    async def list(self, *, agent_id: str | None = None, page_size: int = 50) -> AsyncIterator[Run]:
        """Every run (of ``agent_id``), newest first, fetched a page at a time."""
        before: str | None = None
        while True:
            page, before = rq.runs_page(
                await self._c.send(rq.list_runs(agent_id=agent_id, limit=page_size, before=before))
            )
            for run in page:
                yield run
            if before is None:
                return


class Memory:
    """The tenant's agent memory (``client.memory``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def get(self, key: str) -> str:
        """The value of ``key``. Raises: NotFound: no such key."""
        return (await self._c.send(rq.get_memory(key))).value

    async def put(self, key: str, value: str) -> MemoryItem:
        return await self._c.send(rq.put_memory(key, value))

    async def delete(self, key: str) -> None:
        await self._c.send(rq.delete_memory(key))

    async def list(self, prefix: str = "", *, limit: int = 100) -> list[str]:
        """Keys starting with ``prefix``, ``limit`` at most."""
        return await self._c.send(rq.list_memory(prefix, limit))


class Secrets:
    """The tenant's secrets (``client.secrets``; the key needs the scope ``secrets:write``):
    write-only, a value is never answered back."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def put(self, name: str, value: str) -> Secret:
        """Set ``name`` to ``value`` or rotate it (``version`` one more); the secret
        ``provider:<family>`` is the tenant's own provider key (BYOK)."""
        return await self._c.send(rq.put_secret(name, value))

    async def list(self) -> list[Secret]:
        """The tenant's secrets: names, versions and dates."""
        return await self._c.send(rq.list_secrets())

    async def delete(self, name: str) -> None:
        """Delete ``name``. Raises: NotFound: no such secret."""
        await self._c.send(rq.delete_secret(name))


class Admin:
    """The operator's routes (``client.admin``; the client's key must be the operator's)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client
        self.tenants = Tenants(client)
        self.keys = Keys(client, operator=True)

    async def usage(self, tenant_id: str | None = None, since: str | None = None) -> list[UsageSummary]:
        return await self._c.send(rq.usage_summary(tenant_id, since))

    async def audit(
        self, tenant_id: str | None = None, *, after_seq: int = 0, limit: int = 100
    ) -> list[AuditEntry]:
        return await self._c.send(rq.operator_audit(tenant_id, after_seq=after_seq, limit=limit))


class Tenants:
    """Tenants (``client.admin.tenants``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
        self,
        name: str,
        *,
        plan: str | None = None,
        isolation_level: str | None = None,
        storage_model: str | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> Tenant:
        return await self._c.send(
            rq.create_tenant(
                name, plan=plan, isolation_level=isolation_level, storage_model=storage_model, limits=limits
            )
        )

    async def list(self, *, include_deleted: bool = False) -> list[Tenant]:
        return await self._c.send(rq.list_tenants(include_deleted))

    async def get(self, tenant_id: str) -> Tenant:
        return await self._c.send(rq.get_tenant(tenant_id))

    async def config(self, tenant_id: str) -> TenantConfig:
        """The tenant's settings with their layers."""
        return await self._c.send(rq.tenant_config(tenant_id))

    async def endpoint(self, tenant_id: str) -> Endpoint:
        """The tenant's slug, custom domains and host names."""
        return await self._c.send(rq.tenant_endpoint(tenant_id))

    async def set_endpoint(
        self, tenant_id: str, *, slug: str | None = None, domains: Sequence[str] | None = None
    ) -> Endpoint:
        """Set the tenant's slug and/or custom domains (the whole list); a name given up is
        held back from other tenants for the deployment's quarantine (409 ``already_exists``
        for a name another tenant holds or gave up less than that ago)."""
        return await self._c.send(rq.set_tenant_endpoint(tenant_id, slug, domains))

    async def update(self, tenant_id: str, **changes: Any) -> Tenant:
        """Change ``plan``, ``limits``, ``isolation_level`` (with ``drain_timeout_s``)."""
        return await self._c.send(rq.update_tenant(tenant_id, changes))

    async def suspend(self, tenant_id: str) -> Tenant:
        return await self._c.send(rq.tenant_action(tenant_id, "suspend"))

    async def resume(self, tenant_id: str) -> Tenant:
        return await self._c.send(rq.tenant_action(tenant_id, "resume"))

    async def delete(self, tenant_id: str) -> dict[str, Any]:
        """Delete the tenant and crypto-shred its data; returns the deletion's summary."""
        return await self._c.send(rq.delete_tenant(tenant_id))


class Keys:
    """API keys: a tenant's own (``client.keys``, a key with ``keys:write``: never with a
    scope it lacks itself) or any tenant's (``client.admin.keys``, operator key)."""

    def __init__(self, client: AsyncClient, *, operator: bool) -> None:
        self._c = client
        self._operator = operator

    def _tenant(self, tenant_id: str | None) -> str | None:
        if self._operator and tenant_id is None:
            raise TypeError("client.admin.keys needs the tenant_id")
        return tenant_id if self._operator else None

    async def create(
        self,
        name: str,
        *,
        tenant_id: str | None = None,
        scopes: list[str] | None = None,
        expires_at: datetime | None = None,
    ) -> IssuedKey:
        """A new key (its secret in ``.key``, shown this once)."""
        return await self._c.send(rq.create_key(self._tenant(tenant_id), name, scopes, expires_at))

    async def list(self, tenant_id: str | None = None) -> list[Key]:
        """The keys, revoked and expired ones included; no secrets."""
        return await self._c.send(rq.list_keys(self._tenant(tenant_id)))

    async def rotate(
        self,
        key_id: str,
        *,
        tenant_id: str | None = None,
        overlap_s: float = 3600.0,
        expires_at: datetime | None = None,
    ) -> IssuedKey:
        """A new key with the old one's name and scopes; the old one works on for
        ``overlap_s`` seconds."""
        return await self._c.send(rq.rotate_key(self._tenant(tenant_id), key_id, overlap_s, expires_at))

    async def revoke(self, key_id: str, *, tenant_id: str | None = None) -> Key:
        return await self._c.send(rq.revoke_key(self._tenant(tenant_id), key_id))


class Threads:
    """The tenant's conversation threads (``client.threads``): a run on a thread is sent the
    thread's messages as history, and a successful one appends its input and reply."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
        self, metadata: Mapping[str, str] | None = None, *, idempotency_key: str | None = None
    ) -> Thread:
        """A new empty thread; ``metadata``: at most 16 entries (keys 1-64, values at most
        512 characters).

        Raises:
            InvalidRequest: the metadata is too large.
            QuotaExceeded: the tenant already holds its plan's ``max_threads`` threads.
        """
        return await self._c.send(rq.create_thread(metadata, idempotency_key))

    async def get(self, thread_id: str) -> Thread:
        """The thread. Raises: NotFound: no such thread (another tenant's alike)."""
        return await self._c.send(rq.get_thread(thread_id))

    async def delete(self, thread_id: str) -> None:
        """Delete the thread and its messages. Raises: NotFound: no such thread."""
        await self._c.send(rq.delete_thread(thread_id))

    async def list(self, *, page_size: int = 50) -> AsyncIterator[Thread]:
        """Every thread, newest first, fetched a page at a time."""
        before: str | None = None
        while True:
            page, before = rq.threads_page(
                await self._c.send(rq.list_threads(limit=page_size, before=before))
            )
            for thread in page:
                yield thread
            if before is None:
                return

    async def messages(self, thread_id: str, *, page_size: int = 100) -> AsyncIterator[ThreadMessage]:
        """Every message of the thread, oldest first, fetched a page at a time.

        Raises:
            NotFound: no such thread (another tenant's alike).
        """
        after: str | None = None
        while True:
            page, after = rq.messages_page(
                await self._c.send(rq.list_messages(thread_id, limit=page_size, after=after))
            )
            for message in page:
                yield message
            if after is None:
                return

    async def run(
        self,
        thread_id: str,
        agent_id: str,
        prompt: str,
        *,
        output_tokens: int | None = None,
        idempotency_key: str | None = None,
    ) -> ThreadRun:
        """Run the agent on the thread and wait for its end: the thread's messages are the
        model's history; on success the prompt and the reply are appended.

        Raises:
            NotFound: no such thread or agent.
            RunFailed: the run failed or was cancelled (nothing was appended).
        """
        return await self._c.send(
            rq.run_on_thread(
                thread_id, agent_id, prompt, output_tokens=output_tokens, idempotency_key=idempotency_key
            )
        )


class Webhooks:
    """The tenant's webhook endpoints (``client.webhooks``): writes need a key with
    ``webhooks:write``, reads ``read``. A secret is answered only by :meth:`create` and
    :meth:`rotate`."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
        self,
        url: str,
        event_types: list[str],
        *,
        description: str = "",
        idempotency_key: str | None = None,
    ) -> WebhookWithSecret:
        """Register an ``https`` endpoint for ``event_types`` (``run.succeeded``,
        ``run.failed``, ``run.cancelled``); its signing secret is in ``.secret``, this once.

        Raises:
            WebhookUrlRefused: the URL can never be sent to (422).
        """
        return await self._c.send(rq.create_webhook(url, event_types, description, idempotency_key))

    async def get(self, endpoint_id: str) -> Webhook:
        return await self._c.send(rq.get_webhook(endpoint_id))

    async def delete(self, endpoint_id: str) -> Webhook:
        """Delete the endpoint with its pending deliveries and delivery log."""
        return await self._c.send(rq.delete_webhook(endpoint_id))

    async def rotate(self, endpoint_id: str, *, overlap_s: float = 86_400.0) -> WebhookWithSecret:
        """A new secret (in ``.secret``, this once); the previous one signs beside it for
        ``overlap_s`` seconds."""
        return await self._c.send(rq.rotate_webhook(endpoint_id, overlap_s))

    async def enable(self, endpoint_id: str) -> Webhook:
        """Make an endpoint disabled after consecutive failures active again."""
        return await self._c.send(rq.enable_webhook(endpoint_id))

    async def ping(self, endpoint_id: str) -> WebhookPing:
        """Queue a ``webhook.ping`` event to the endpoint."""
        return await self._c.send(rq.ping_webhook(endpoint_id))

    async def attempts(
        self, endpoint_id: str, *, limit: int = 50, before: str | None = None
    ) -> list[WebhookAttempt]:
        """The endpoint's delivery log, newest first: one entry per attempt."""
        return await self._c.send(rq.webhook_attempts(endpoint_id, limit, before))

    async def list(self) -> list[Webhook]:
        return await self._c.send(rq.list_webhooks())
