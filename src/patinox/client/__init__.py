"""A Python client of the Patinox HTTP API, on httpx: :class:`Client` (blocking) and
:class:`AsyncClient` (asyncio), with the same resources:

- ``client.agents``, ``client.runs`` (``create`` runs and waits; ``submit`` queues,
  ``wait`` polls; ``list`` pages through every run), ``client.threads`` (conversations:
  ``create``, ``run``, ``messages``, ``list``, ``get``, ``delete``), ``client.memory``, ``client.me()``,
  ``client.config()``, ``client.usage()``, ``client.audit()`` — as a tenant key;
- ``client.webhooks`` — the tenant's webhook endpoints (register, rotate, ping, delivery
  log); :func:`verify_signature` checks a delivery on the receiving side;
- ``client.admin.tenants``, ``client.admin.keys``, ``client.admin.usage()``,
  ``client.admin.audit()`` — as the operator key.

Results are typed (:mod:`patinox.client.models`); the server's errors are raised as the
package's own exceptions (:mod:`patinox.errors`, by the error's ``code``). Importing it
loads neither FastAPI, SQLAlchemy nor pydantic-ai.

Example::

    from patinox.client import Client

    with Client("http://127.0.0.1:8000", "ptx_...") as client:
        agent = client.agents.create("helper", model="simulated")
        run = client.runs.create(agent.id, "Hello")
        print(run.output, run.input_tokens, run.output_tokens)
"""

from patinox.client._signing import verify_signature
from patinox.client.aio import AsyncClient
from patinox.client.models import (
    Agent,
    Attempt,
    AuditEntry,
    Endpoint,
    IssuedKey,
    Key,
    Me,
    MemoryItem,
    Run,
    Secret,
    Setting,
    Tenant,
    TenantConfig,
    TenantUsage,
    Thread,
    ThreadMessage,
    ThreadRun,
    UsageRecord,
    UsageSummary,
    Webhook,
    WebhookAttempt,
    WebhookPing,
    WebhookWithSecret,
)
from patinox.client.sync import Client

__all__ = [
    "Agent",
    "AsyncClient",
    "Attempt",
    "AuditEntry",
    "Client",
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
    "verify_signature",
]
