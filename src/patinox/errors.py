"""The whole Patinox exception tree.

::

    PatinoxError                         root of everything Patinox raises
    ├── ConfigurationError               misuse by the caller; fix the call, do not retry
    │   ├── InvalidRequest               a spec or body failed validation       (422 invalid_request)
    │   │   ├── IdempotencyKeyReused     an Idempotency-Key sent with another
    │   │   │                            request than its first                 (422 idempotency_key_reused)
    │   │   ├── UnsupportedParameter     a parameter the runtime cannot honour  (400 unsupported_parameter)
    │   │   ├── WebhookUrlRefused        a webhook URL the address guard refuses
    │   │   │                            outright (http://, a private literal)  (422 webhook_url_refused)
    │   │   └── InvalidTls               a TLS certificate or key not usable    (422 invalid_tls)
    │   │       ├── TlsKeyMismatch       the key is not the certificate's       (422 tls_key_mismatch)
    │   │       ├── TlsNameNotCovered    a tenant host name not in the SANs     (422 tls_name_not_covered)
    │   │       └── TlsExpired           the certificate has expired            (422 tls_expired)
    │   ├── InvalidIdempotencyKey        an empty or over-long Idempotency-Key  (400 invalid_idempotency_key)
    │   ├── TenantContextMissing         tenant-scoped code ran with no tenant  (500, fail closed)
    │   ├── TenantContextAlreadySet      a tenant scope was entered twice
    │   ├── InvalidTransition            lifecycle transition not allowed       (409 invalid_transition)
    │   │   └── RunFinished              cancel of a run that already finished  (409 run_finished)
    │   ├── UnknownModel                 model id not known or not configured   (422 unknown_model)
    │   ├── UnknownTool                  tool name not known or not allowed     (422 unknown_tool)
    │   │   └── ToolNotAllowed           a tool the tenant's allow-list leaves out (403 tool_not_allowed)
    │   ├── IsolationUnavailable         isolation level not built/enforceable  (422 isolation_unavailable)
    │   ├── IsolationRequired            a tool needs a higher isolation level  (422 isolation_required)
    │   ├── ExceedsBudget                a run larger than its whole budget     (422 exceeds_budget)
    │   └── MissingDependency            an optional extra is not installed
    ├── OperationFailed                  runtime failures, structured, picklable across processes
    │   ├── AuthenticationFailed         no, malformed, wrong or revoked key    (401 unauthenticated)
    │   ├── PermissionDenied             key lacks the scope for the route      (403 forbidden)
    │   │   └── ModelNotAllowed          a model outside the tenant's allow-list (403 model_not_allowed)
    │   ├── TenantSuspended              tenant is suspended                    (403 tenant_suspended)
    │   ├── TenantMoving                 writes held during a storage move      (503 tenant_moving)
    │   ├── NotFound                     missing OR another tenant's object     (404 not_found)
    │   │   └── TenantNotFound
    │   ├── AlreadyExists                unique name taken within the tenant   (409 already_exists)
    │   ├── IdempotencyInProgress        the first request with this
    │   │                                Idempotency-Key has not finished       (409 idempotency_in_progress)
    │   ├── RateLimited                  request rate over the limit            (429 rate_limited)
    │   ├── ConcurrencyLimited           too many runs in flight                (429 concurrency_limited)
    │   ├── QuotaExceeded                period budget spent                    (429 quota_exceeded)
    │   ├── Overloaded                   the process is at capacity and the
    │   │                                tenant has its fair share of it        (503 overloaded)
    │   ├── RunFailed                    the agent run failed                   (502 run_failed)
    │   ├── DecryptionFailed             ciphertext failed authentication       (500 decryption_failed)
    │   ├── IsolationFailed              a cgroup, mount or OS limit could not
    │   │                                be applied or read (original chained)  (500 isolation_failed)
    │   ├── TenantKeysDestroyed          the tenant was crypto-shredded         (410 tenant_keys_destroyed)
    │   ├── EgressRefused                an outbound URL the tenant's policy or
    │   │                                the address guard refuses             (403 egress_refused)
    │   ├── OutboundFailed               an allowed outbound request failed     (502 outbound_failed)
    │   ├── ServerError                  a server's error with a code this package
    │   │                                does not know (the client)             (its code and status)
    │   └── StorageError                 the database failed (original chained) (503 storage_error)
    │       └── LimitStoreUnavailable    the rate-limit store (Redis) failed    (503 limit_store_unavailable)
    └── ControlSignal                    not failures; used for flow control inside the runtime

Every error carries a stable ``code`` (the JSON ``error.code`` of the HTTP API) and an
``http_status``; runtime failures carry their structured fields as attributes and in
``fields`` and survive :mod:`pickle` so worker processes can send them back.
:func:`error_for` makes the exception for a code and status the API answered (the
client's errors), :func:`class_for_code` finds a class by its code.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

__all__ = [
    "AlreadyExists",
    "AuthenticationFailed",
    "ConcurrencyLimited",
    "ConfigurationError",
    "ControlSignal",
    "DecryptionFailed",
    "EgressRefused",
    "ExceedsBudget",
    "IdempotencyInProgress",
    "IdempotencyKeyReused",
    "InvalidIdempotencyKey",
    "InvalidRequest",
    "InvalidTls",
    "InvalidTransition",
    "IsolationFailed",
    "IsolationRequired",
    "IsolationUnavailable",
    "LimitStoreUnavailable",
    "MissingDependency",
    "ModelNotAllowed",
    "NotFound",
    "OperationFailed",
    "OutboundFailed",
    "Overloaded",
    "PatinoxError",
    "PermissionDenied",
    "QuotaExceeded",
    "RateLimited",
    "RunFailed",
    "RunFinished",
    "ServerError",
    "StorageError",
    "TenantContextAlreadySet",
    "TenantContextMissing",
    "TenantKeysDestroyed",
    "TenantMoving",
    "TenantNotFound",
    "TenantSuspended",
    "TlsExpired",
    "TlsKeyMismatch",
    "TlsNameNotCovered",
    "ToolNotAllowed",
    "UnknownModel",
    "UnknownTool",
    "UnsupportedParameter",
    "WebhookUrlRefused",
    "class_for_code",
    "error_for",
]


def _rebuild(cls: type[PatinoxError], message: str, fields: dict[str, Any]) -> PatinoxError:
    err = cls.__new__(cls)
    PatinoxError.__init__(err, message, **fields)
    return err


class PatinoxError(Exception):
    """Root of the tree.

    Args:
        message: human-readable text; never contains another tenant's data.
        **fields: structured details (JSON-serialisable), exposed as attributes and in
            ``fields``; the HTTP API returns them under ``error.details``.
    """

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    # Typed views of the fields most errors may carry; ``None`` when this one does not.
    tenant_id: str | None = None
    retry_after_s: float | None = None  #: seconds until a retry may succeed (429 / 503)

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields: dict[str, Any] = dict(fields)
        for key, value in fields.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.fields))

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body: ``{"code", "message", "details"}``."""
        return {"code": self.code, "message": self.message, "details": self.fields}


# --- misuse by the caller -------------------------------------------------------------


class ConfigurationError(PatinoxError):
    """The caller used Patinox wrongly; retrying the same call fails the same way."""

    code = "configuration_error"
    http_status = 400


class InvalidRequest(ConfigurationError):
    """A tenant spec, limit override or request body failed validation."""

    code = "invalid_request"
    http_status = 422


class UnsupportedParameter(InvalidRequest):
    """A request parameter the runtime cannot honour (``n`` > 1, client tools, a response
    format it cannot enforce...): refused, never ignored. Field ``field`` names it."""

    code = "unsupported_parameter"
    http_status = 400


class WebhookUrlRefused(InvalidRequest):
    """A webhook endpoint's URL that can never be sent to under the deployment's outbound
    policy: not ``https``, user-info, or a literal loopback, private or link-local address
    outside the operator's allowed ranges. Fields: ``url``, ``reason`` (as
    :class:`EgressRefused`'s)."""

    code = "webhook_url_refused"
    http_status = 422

    url: str | None = None
    reason: str | None = None


class InvalidTls(InvalidRequest):
    """A TLS certificate chain or private key that cannot be served: not PEM, an encrypted
    key, no host names to serve, not yet valid (:mod:`patinox.control.tls`)."""

    code = "invalid_tls"


class TlsKeyMismatch(InvalidTls):
    """The private key uploaded is not the (first) certificate's."""

    code = "tls_key_mismatch"


class TlsNameNotCovered(InvalidTls):
    """A host name of the tenant is not covered by the certificate's subjectAltName
    (fields ``hosts``: the names not covered, ``sans``: the certificate's names)."""

    code = "tls_name_not_covered"


class TlsExpired(InvalidTls):
    """The certificate's validity has ended (field ``not_after``, ISO 8601 UTC)."""

    code = "tls_expired"


class TenantContextMissing(ConfigurationError):
    """Tenant-scoped code ran with no tenant context. Fails closed: never 'all tenants'."""

    code = "tenant_context_missing"
    http_status = 500


class TenantContextAlreadySet(ConfigurationError):
    """A tenant scope was entered while another was active (a context leak or a bug)."""

    code = "tenant_context_already_set"
    http_status = 500


class InvalidTransition(ConfigurationError):
    """A lifecycle transition that the tenant's state does not allow (e.g. resume a deleted tenant)."""

    code = "invalid_transition"
    http_status = 409


class RunFinished(InvalidTransition):
    """A cancel of a run that already finished (succeeded or failed). Field: ``status``."""

    code = "run_finished"
    http_status = 409


class IdempotencyKeyReused(InvalidRequest):
    """An ``Idempotency-Key`` sent again with another request (method, route or body)
    than the one it was first sent with, within its 24 hours."""

    code = "idempotency_key_reused"
    http_status = 422


class InvalidIdempotencyKey(ConfigurationError):
    """An ``Idempotency-Key`` header that is empty or longer than 255 characters."""

    code = "invalid_idempotency_key"
    http_status = 400


class UnknownModel(ConfigurationError):
    """A model id that is unknown, not installed, or has no provider key configured."""

    code = "unknown_model"
    http_status = 422


class UnknownTool(ConfigurationError):
    """A tool name that does not exist or is not allowed for the tenant."""

    code = "unknown_tool"
    http_status = 422


class ToolNotAllowed(UnknownTool):
    """A tool that exists but is not on the tenant's tool allow-list (its plan's, or its
    own override ``allowed_tools``): refused when an agent naming it is defined, and again
    when a run of such an agent starts or executes after the list changed. Fields:
    ``tool``, ``allowed`` (the names the tenant may use)."""

    code = "tool_not_allowed"
    http_status = 403


class IsolationUnavailable(ConfigurationError):
    """An isolation level this deployment cannot enforce; refused rather than ignored.

    Fields, when known: ``isolation_level``, ``tenant_id``; for CPU cores (``dedicated``)
    ``requested_cores`` and ``free_cores`` (how many could still be given to one tenant);
    for a missing host mechanism ``mechanism`` (e.g. ``"cgroup cpuset controller"``)."""

    code = "isolation_unavailable"
    http_status = 422

    isolation_level: str | None = None
    requested_cores: int | None = None
    free_cores: int | None = None
    mechanism: str | None = None


class IsolationRequired(ConfigurationError):
    """An agent's tools need a higher isolation level than the tenant's: defining (or
    updating) such an agent, or lowering the tenant's level below what its agents need, is
    refused. The ``python`` tool runs model-written code, so it needs ``container`` or above.
    Fields: ``tool`` (the first tool that needs more), ``required`` (the lowest level that
    allows it), ``isolation_level`` (the tenant's, or the one asked for) and, when lowering a
    level, ``agents`` (the names of the agents in the way)."""

    code = "isolation_required"
    http_status = 422

    tool: str | None = None
    required: str | None = None
    isolation_level: str | None = None
    agents: list[str] | None = None


class ExceedsBudget(ConfigurationError):
    """A run's worst case needs more tokens than its whole budget for a day: no day can
    admit it, so it is refused for good (no ``retry_after_s``), unlike
    :class:`QuotaExceeded`. Ask for fewer output tokens, send a shorter prompt or raise the
    limit. Fields: ``tenant_id``, ``quota`` (``tokens_per_day``), ``limit`` and
    ``requested`` (the run's worst case), tokens."""

    code = "exceeds_budget"
    http_status = 422

    quota: str | None = None
    limit: int | None = None
    requested: int | None = None


class MissingDependency(ConfigurationError):
    """An optional dependency is not installed; the message names the pip extra."""

    code = "missing_dependency"
    http_status = 500


# --- runtime failures -----------------------------------------------------------------


class OperationFailed(PatinoxError):
    """A runtime failure with structured fields; safe to pickle across processes."""

    code = "operation_failed"
    http_status = 500


class AuthenticationFailed(OperationFailed):
    """No API key, a malformed one, a wrong one, or a revoked one. Same answer for all four."""

    code = "unauthenticated"
    http_status = 401


class PermissionDenied(OperationFailed):
    """The key is valid but lacks the scope the route needs."""

    code = "forbidden"
    http_status = 403


class ModelNotAllowed(PermissionDenied):
    """The model is outside the tenant's allow-list (its plan's, or its own override):
    refused when an agent names it and again when a run reaches it (the list may have
    changed since the agent was defined). Fields: ``model`` and ``allowed_models``."""

    code = "model_not_allowed"
    http_status = 403


class TenantSuspended(OperationFailed):
    """The tenant is suspended: its data is kept, every tenant call is refused."""

    code = "tenant_suspended"
    http_status = 403


class TenantMoving(OperationFailed):
    """The tenant is moving between storage models: reads are served, writes are held.
    Fields: ``tenant_id``, ``retry_after_s`` (seconds)."""

    code = "tenant_moving"
    http_status = 503


class NotFound(OperationFailed):
    """The object does not exist for this tenant. A foreign tenant's object answers the same."""

    code = "not_found"
    http_status = 404


class TenantNotFound(NotFound):
    """No such tenant (or it was deleted)."""


class AlreadyExists(OperationFailed):
    """A unique name is already taken (within the tenant for tenant objects)."""

    code = "already_exists"
    http_status = 409


class IdempotencyInProgress(OperationFailed):
    """The first request with this ``Idempotency-Key`` has not finished yet; retry later.
    Field: ``retry_after_s``."""

    code = "idempotency_in_progress"
    http_status = 409


class RateLimited(OperationFailed):
    """Request rate over the limit. Fields: ``tenant_id``, ``limit``, ``retry_after_s`` (seconds)."""

    code = "rate_limited"
    http_status = 429

    limit: int | None = None  #: hits per window
    policy: str | None = None  #: the RateLimit-Policy name, when the limiter refused
    reset_after_s: int | None = None
    window_s: int | None = None


class ConcurrencyLimited(OperationFailed):
    """Too many runs in flight. Fields: ``tenant_id``, ``limit``, ``in_flight``, ``retry_after_s``."""

    code = "concurrency_limited"
    http_status = 429

    limit: int | None = None
    in_flight: int | None = None


class QuotaExceeded(OperationFailed):
    """A period budget is spent. Fields: ``tenant_id``, ``quota``, ``limit``, ``used``,
    ``requested``, ``reset_at`` (ISO 8601 UTC), ``retry_after_s`` (seconds)."""

    code = "quota_exceeded"
    http_status = 429

    quota: str | None = None
    limit: int | None = None
    used: int | None = None
    requested: int | None = None
    reset_at: str | None = None


class Overloaded(OperationFailed):
    """The process serving the run is at capacity, and the tenant already runs its fair
    share of it: the run waited its bounded time for a turn and was not started (nothing
    was reserved or written). Fields: ``tenant_id``, ``retry_after_s`` (an estimate of when
    the tenant's turn comes), ``waited_s``, ``limit`` and ``running`` (runs). Distinct
    from 429, which means the tenant's own limits."""

    code = "overloaded"
    http_status = 503

    waited_s: float | None = None
    limit: int | None = None
    running: int | None = None


class RunFailed(OperationFailed):
    """The agent run failed (model error, tool error, limit hit inside the run, timeout).

    ``reason`` says why (see :mod:`patinox.agents.runner`); runs in an execution process
    (isolation levels ``process`` and above) may also fail with ``worker_crashed`` (the
    process died, not by a limit), ``memory_limit`` (killed by the OOM killer: the tenant's
    cgroup counted an OOM kill), ``cpu_limit`` (past ``cpu_seconds_per_run``), and
    ``disk_limit`` (the tenant's writable directory is full); they carry ``cpu_seconds``
    and ``peak_memory_bytes`` of their process where measured.
    """

    code = "run_failed"
    http_status = 502

    # What the failed attempt used and why it failed (charged like a finished run).
    reason: str = "error"
    model: str = "unknown"
    simulated: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    tool_calls: int = 0
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None


class DecryptionFailed(OperationFailed):
    """A ciphertext or wrapped key failed authentication or could not be opened.

    Raised for tampered bytes, a ciphertext copied to another tenant, table, row or key
    version, a key version that does not exist, a wrapped DEK moved to another tenant, or
    a KEK version the key provider does not hold. Deliberately one error for all of
    them: the caller cannot act differently, and telling them apart helps an attacker.
    Fields: ``reason`` (a short stable token, e.g. ``"authentication_failed"``) and,
    when known, ``tenant_id``, ``table``, ``record_id``, ``key_version``.
    """

    code = "decryption_failed"
    http_status = 500

    reason: str | None = None
    table: str | None = None
    record_id: str | None = None
    key_version: int | None = None


class TenantKeysDestroyed(OperationFailed):
    """The tenant's DEKs were destroyed (crypto-shredded); nothing of it decrypts any more.

    Distinct from "no key yet": a shredded tenant never gets a new DEK either, so data
    written after deletion by a straggling worker cannot appear. Fields: ``tenant_id``.
    """

    code = "tenant_keys_destroyed"
    http_status = 410


class IsolationFailed(OperationFailed):
    """The operating system refused or failed an isolation step: a cgroup file could not be
    created, written or read, a working directory could not be mounted, a process could not
    be moved or killed. Fail closed: a limit that cannot be applied raises this, it is never
    skipped. The ``OSError`` is chained as ``__cause__``. Fields: ``path`` (the file or
    directory), ``operation`` (``mkdir``, ``write``, ``read``, ``rmdir``, ``mount``, ``kill``...),
    ``errno_name`` (``EACCES``, ``EBUSY``...; ``None`` when not an OS error)."""

    code = "isolation_failed"
    http_status = 500

    path: str | None = None
    operation: str | None = None
    errno_name: str | None = None

    @classmethod
    def from_os_error(cls, operation: str, path: object, err: OSError) -> IsolationFailed:
        """The error for ``err`` raised while doing ``operation`` on ``path`` (raise it
        ``from err``): ``cannot <operation> <path>: <strerror>``."""
        name = errno.errorcode.get(err.errno) if err.errno is not None else None
        return cls(
            f"cannot {operation} {path}: {err.strerror or err}",
            path=str(path),
            operation=operation,
            errno_name=name,
        )


class EgressRefused(OperationFailed):
    """An outbound request (webhook, ``http_fetch``) to a URL the tenant may not reach: a
    scheme, host or address its policy or the deployment's address guard refuses
    (:mod:`patinox.network.outbound`). Fields: ``url`` (without user-info or query),
    ``reason`` (``invalid_url``, ``scheme``, ``userinfo``, ``host_not_allowed``,
    ``unresolvable``, ``address_not_allowed``), ``host``, ``address``."""

    code = "egress_refused"
    http_status = 403

    url: str | None = None
    reason: str | None = None


class OutboundFailed(OperationFailed):
    """An allowed outbound request failed. Fields: ``url``, ``reason`` (``connect``,
    ``tls``, ``timeout``, ``too_large``, ``too_many_redirects``, ``protocol``)."""

    code = "outbound_failed"
    http_status = 502

    url: str | None = None
    reason: str | None = None


class StorageError(OperationFailed):
    """The database failed; the driver's exception is chained as ``__cause__``."""

    code = "storage_error"
    http_status = 503


class LimitStoreUnavailable(StorageError):
    """The shared rate-limit store (Redis) failed or timed out, so no request limit can be
    checked and the request is refused (fail closed); the driver's exception is chained.
    Fields: ``backend`` (``"redis"``), ``operation`` (``hit``, ``reset``, ``ping``)."""

    code = "limit_store_unavailable"
    http_status = 503

    backend: str | None = None
    operation: str | None = None


class ControlSignal(PatinoxError):
    """Flow control inside the runtime; never reaches a caller."""


class ServerError(OperationFailed):
    """An error a server answered with a ``code`` this package does not know (a newer
    server): :attr:`code` and :attr:`http_status` are the server's."""

    def __init__(self, message: str, *, code: str, http_status: int, **fields: Any) -> None:
        super().__init__(message, **fields)
        vars(self)["code"] = code
        vars(self)["http_status"] = http_status

    def __reduce__(self) -> tuple[Any, ...]:
        return (_server_error, (self.message, vars(self)["code"], vars(self)["http_status"], self.fields))


def _server_error(message: str, code: str, http_status: int, fields: dict[str, Any]) -> ServerError:
    return ServerError(message, code=code, http_status=http_status, **fields)


def class_for_code(code: str) -> type[PatinoxError] | None:
    """The class of this tree whose ``code`` is ``code`` (the most general one when several
    share it: ``not_found`` is :class:`NotFound`), ``None`` when none has it."""
    pending: list[type[PatinoxError]] = [PatinoxError]
    while pending:
        cls = pending.pop(0)  # breadth first: the most general class of a code wins
        if cls.code == code and cls is not ServerError:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def error_for(code: str, message: str, fields: dict[str, Any], http_status: int) -> PatinoxError:
    """The exception for an error the HTTP API answered (``{"error": {"code", "message",
    "details"}}`` and its status): the class of this tree with that ``code`` (``not_found``
    is :class:`NotFound`), with ``details`` as its fields; :class:`ServerError` for a code
    this package does not know, or one whose status differs from the server's."""
    cls = class_for_code(code)
    if cls is None or cls.http_status != http_status:
        return ServerError(message, code=code, http_status=http_status, **fields)
    return _rebuild(cls, message, fields)
