"""The tenant-scoped data layer: backends chosen by URL, control-plane and tenant stores.

Two kinds of access, kept apart:

* :class:`SqlBackend` — the control plane, used by operator code (tenant manager, key
  verification, operator audit and usage views). Its methods take explicit tenant ids
  because operators act *on* tenants; :meth:`SqlBackend.transaction` is the control-plane
  transaction of components that keep statements of their own on control-plane tables
  (:data:`schema`: the run queue, the quota ledger), run with :func:`execute_write`.
* :class:`TenantStore` — everything a tenant owns. It is bound to exactly one tenant when
  made (from the active :class:`~patinox.tenancy.TenantContext`, or one passed in
  explicitly as data) and adds the ``tenant_id`` predicate to every statement itself;
  its callers never pass a tenant id and cannot name another tenant's rows. Which of its
  columns are sealed (encrypted per tenant) is said once, by :func:`sealed_columns`.

The rows they hand upward are typed records (:mod:`patinox.storage.records`: TypedDicts,
plain dicts at run time), exported here.

Modules whose names start with ``_`` are this package's own: nothing outside
``patinox.storage`` imports them (an import-linter contract says so).
"""

from patinox.storage import _schema as schema
from patinox.storage._control_store import SqlBackend, open_backend
from patinox.storage._fast import execute_write
from patinox.storage._hosts import HostClaim, TenantHosts
from patinox.storage._idempotency import IN_PROGRESS_LEASE as IDEMPOTENCY_IN_PROGRESS_LEASE
from patinox.storage._idempotency import KEY_TTL as IDEMPOTENCY_KEY_TTL
from patinox.storage._idempotency import Begun, IdempotencyRecords
from patinox.storage._placement import Placements
from patinox.storage._schema import utcnow
from patinox.storage._sealer import SealedColumn, sealed_columns
from patinox.storage._secrets import (
    MAX_SECRET_BYTES,
    PROVIDER_KEY_PREFIX,
    SecretInfo,
    TenantSecrets,
    check_secret_name,
)
from patinox.storage._statements import PreparedWrite
from patinox.storage._tenant_store import TenantStore
from patinox.storage._threads import MessageRecord, ThreadRecord, ThreadRecords, Turn
from patinox.storage._webhooks import ClaimedDelivery, WebhookEndpoints, WebhookOutbox
from patinox.storage.engine import make_engine, migrate, translate_errors
from patinox.storage.records import (
    AgentRecord,
    AnyRow,
    ApiKeyRecord,
    AttemptRecord,
    AuditEntry,
    AuditRecord,
    Changes,
    KeyTenantRecord,
    RunRecord,
    StoredApiKeyRecord,
    TenantRecord,
    UsageRecord,
    UsageTotals,
)

__all__ = [
    "IDEMPOTENCY_IN_PROGRESS_LEASE",
    "IDEMPOTENCY_KEY_TTL",
    "MAX_SECRET_BYTES",
    "PROVIDER_KEY_PREFIX",
    "AgentRecord",
    "AnyRow",
    "ApiKeyRecord",
    "AttemptRecord",
    "AuditEntry",
    "AuditRecord",
    "Begun",
    "Changes",
    "ClaimedDelivery",
    "HostClaim",
    "IdempotencyRecords",
    "KeyTenantRecord",
    "MessageRecord",
    "Placements",
    "PreparedWrite",
    "RunRecord",
    "SealedColumn",
    "SecretInfo",
    "SqlBackend",
    "StoredApiKeyRecord",
    "TenantHosts",
    "TenantRecord",
    "TenantSecrets",
    "TenantStore",
    "ThreadRecord",
    "ThreadRecords",
    "Turn",
    "UsageRecord",
    "UsageTotals",
    "WebhookEndpoints",
    "WebhookOutbox",
    "check_secret_name",
    "execute_write",
    "make_engine",
    "migrate",
    "open_backend",
    "schema",
    "sealed_columns",
    "translate_errors",
    "utcnow",
]
