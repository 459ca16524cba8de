"""Webhooks for run events: endpoints (:class:`WebhookService`), the outbox written at
settlement, and the delivery loop (:class:`WebhookDispatcher`).

Events: ``run.succeeded``, ``run.failed``, ``run.cancelled`` (:data:`EVENT_TYPES`), and
``webhook.ping`` (sent by ``POST /v1/webhooks/{id}/ping``, to one endpoint).

**Outbox.** When a run settles (:mod:`patinox.control.settlement`), one pending delivery
per active endpoint of its tenant that receives the event is written to the shared
outbox (``webhook_deliveries``): in the same transaction as the settlement where the
tenant's rows share the control plane's database (``pool``), so a run is recorded
settled if and only if its deliveries are; right after the run's records commit
otherwise (``bridge``, ``silo``: no transaction spans both databases; a process dying
between the two commits loses that run's deliveries, and a failure to write them is
logged). The body is made when sent, from the run's record.

**Delivery.** A :class:`WebhookDispatcher` runs in every process that runs a queue worker
(the server's embedded worker and ``patinox worker``): it claims due deliveries under a
lease (a crash loses none: the lease expires and another loop takes them; two loops never
hold one at once), POSTs each through the deployment's
:class:`~patinox.network.outbound.OutboundGuard` (never to loopback, private or
link-local addresses unless the operator allowed the range), and logs every attempt
(time, status code or error, duration). A 2xx answer delivers it; anything else is
retried with exponential backoff and jitter (:func:`backoff_s`) up to
:attr:`WebhookSettings.max_attempts`. After :attr:`WebhookSettings.disable_after`
consecutive failed attempts the endpoint is disabled, audited (``webhook.disable``).

**Signing** follows Standard Webhooks: headers ``webhook-id`` (the delivery id, the same on
every retry), ``webhook-timestamp`` (Unix seconds of the attempt) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` under the secret's bytes, the base64
after ``whsec_``); during a rotation's overlap one signature per secret, space-separated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import math
import os
import random
import secrets as _secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import httpx
import structlog
from sqlalchemy import Connection

from patinox.control.settlement import outcome_of
from patinox.errors import (
    ConfigurationError,
    DecryptionFailed,
    EgressRefused,
    InvalidRequest,
    NotFound,
    OutboundFailed,
    PatinoxError,
    TenantKeysDestroyed,
    WebhookUrlRefused,
)
from patinox.network import OutboundGuard, OutboundPolicy
from patinox.storage import AnyRow, ClaimedDelivery, RunRecord, SqlBackend, TenantStore, WebhookOutbox, utcnow
from patinox.tenancy import TenantContext, TenantState

__all__ = [
    "EVENT_TYPES",
    "PING",
    "WebhookDispatcher",
    "WebhookService",
    "WebhookSettings",
    "backoff_s",
    "new_secret",
    "sign",
    "signature_header",
]

log = structlog.get_logger("patinox.webhooks")

#: The run events an endpoint may receive.
EVENT_TYPES: Final = ("run.succeeded", "run.failed", "run.cancelled")
#: The test event ``POST /v1/webhooks/{id}/ping`` sends.
PING: Final = "webhook.ping"
#: Longest overlap a rotation may give the previous secret, seconds (7 days).
MAX_OVERLAP_S: Final = 7 * 86_400
_SECRET_PREFIX: Final = "whsec_"
#: Seconds between two purges of finished deliveries by one loop.
_PURGE_EVERY_S: Final = 3600.0


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    """How this deployment sends webhooks.

    Attributes:
        allowed_ranges: address ranges (CIDR) the operator allows although not public
            (``PATINOX_WEBHOOK_ALLOWED_RANGES``, comma-separated), e.g. receivers on the
            deployment's private network; none by default.
        ca_bundle: a PEM file of the CAs receivers' certificates are checked against
            instead of the system's (``PATINOX_WEBHOOK_CA_BUNDLE``).
        timeout_s: one attempt's time limit, redirects included, seconds.
        max_attempts: attempts per delivery before it fails (1 to 50).
        backoff_base_s: the wait before the second attempt, doubled for each next one,
            seconds (before jitter: see :func:`backoff_s`).
        backoff_max_s: the longest wait between two attempts, seconds.
        disable_after: consecutive failed attempts (any delivery) that disable an endpoint
            (``PATINOX_WEBHOOK_DISABLE_AFTER``).
        poll_s: a delivery loop's wait between two looks at an empty outbox, seconds.
        batch: deliveries a loop claims, and sends concurrently, at a time.
        retention_s: how long finished deliveries and the delivery log are kept, seconds
            (30 days; each loop deletes older ones about once an hour).

    Raises:
        ConfigurationError: a value out of range.
    """

    allowed_ranges: tuple[str, ...] = ()
    ca_bundle: str | None = None
    timeout_s: float = 10.0
    max_attempts: int = 8
    backoff_base_s: float = 10.0
    backoff_max_s: float = 3600.0
    disable_after: int = 20
    poll_s: float = 1.0
    batch: int = 16
    retention_s: float = 30 * 86_400.0
    _policy: OutboundPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (
            not 1 <= self.max_attempts <= 50
            or self.disable_after < 1
            or self.batch < 1
            or self.retention_s <= 0
        ):
            raise ConfigurationError(
                "webhook max_attempts must be 1 to 50, disable_after and batch at least 1, retention_s > 0"
            )
        if self.timeout_s <= 0 or self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ConfigurationError("webhook timeout_s must be > 0 and 0 <= backoff_base_s <= backoff_max_s")
        try:
            ranges = OutboundPolicy.ranges(self.allowed_ranges)
        except InvalidRequest as err:
            raise ConfigurationError(f"PATINOX_WEBHOOK_ALLOWED_RANGES: {err.message}") from None
        policy = OutboundPolicy(
            allowed_ranges=ranges,
            timeout_s=self.timeout_s,
            ca_bundle=self.ca_bundle,
            max_response_bytes=64 * 1024,
            max_redirects=0,
        )
        object.__setattr__(self, "_policy", policy)

    @property
    def policy(self) -> OutboundPolicy:
        """The outbound policy deliveries are sent under (``https`` only, any public host,
        :attr:`allowed_ranges`, :attr:`ca_bundle`, :attr:`timeout_s`; no redirect is
        followed: a 3xx answer is a failed attempt; a receiver's answer is read up to 64 KiB)."""
        return self._policy

    @property
    def lease_s(self) -> float:
        """How long a loop holds a claimed delivery, seconds: well beyond one attempt's
        :attr:`timeout_s`, so a live holder never loses it mid-send."""
        return 2 * self.timeout_s + 30.0

    @classmethod
    def from_env(cls) -> WebhookSettings:
        """Settings from ``PATINOX_WEBHOOK_ALLOWED_RANGES``, ``PATINOX_WEBHOOK_CA_BUNDLE``
        and ``PATINOX_WEBHOOK_DISABLE_AFTER`` (the rest at their defaults).

        Raises:
            ConfigurationError: a value that does not parse.
        """
        ranges = tuple(
            r.strip()
            for r in (os.environ.get("PATINOX_WEBHOOK_ALLOWED_RANGES") or "").split(",")
            if r.strip()
        )
        raw = (os.environ.get("PATINOX_WEBHOOK_DISABLE_AFTER") or "").strip()
        if raw and not raw.isdigit():
            raise ConfigurationError(
                f"PATINOX_WEBHOOK_DISABLE_AFTER must be a whole number >= 1, not {raw!r}"
            )
        return cls(
            allowed_ranges=ranges,
            ca_bundle=os.environ.get("PATINOX_WEBHOOK_CA_BUNDLE") or None,
            disable_after=int(raw) if raw else 20,
        )


# -- signing ---------------------------------------------------------------------------------


def new_secret() -> str:
    """A new signing secret: ``whsec_`` and the base64 of 32 random bytes."""
    return _SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature ``v1,<base64>`` of ``body`` sent as ``msg_id`` at
    ``timestamp`` (Unix seconds): HMAC-SHA256 of ``"{msg_id}.{timestamp}.{body}"`` under the
    bytes the secret's base64 (after ``whsec_``) encodes."""
    key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one signature per secret, space-separated."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


def backoff_s(attempt: int, settings: WebhookSettings, rng: random.Random | None = None) -> float:
    """The wait after failed attempt number ``attempt`` (1, 2, ...), seconds:
    ``backoff_base_s * 2**(attempt-1)``, capped at ``backoff_max_s``, then a random
    fraction of it between one half and all of it (jitter: receivers that failed together
    are not retried together)."""
    full = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** max(0, attempt - 1))
    return float(full * (0.5 + 0.5 * (rng or random).random()))


# -- the tenant's endpoints --------------------------------------------------------------------


class WebhookService:
    """A tenant's webhook endpoints and their delivery log, and the outbox writes of
    settled runs (:meth:`on_settled`).

    Args:
        backend: the deployment's shared database.
        settings: the deployment's webhook settings (its outbound policy checks
            registered URLs).
    """

    def __init__(self, backend: SqlBackend, settings: WebhookSettings | None = None) -> None:
        self.settings = settings or WebhookSettings()
        self.outbox = WebhookOutbox(backend.control_tx, backend.engine)
        self._guard = OutboundGuard(self.settings.policy)

    def check_url(self, url: str) -> str:
        """``url`` if it is one deliveries could ever be sent to: ``https``, no user-info,
        a host, and not a literal address (or ``localhost``) outside the operator's ranges.
        A host name is resolved only when a delivery is sent (and checked again then).

        Raises:
            WebhookUrlRefused: 422 ``webhook_url_refused`` with the ``reason``.
        """
        if len(url) > 2048:
            raise WebhookUrlRefused(
                "a webhook URL is at most 2048 characters", url=url[:100], reason="invalid_url"
            )
        try:
            _static_check(self._guard, url)
        except EgressRefused as err:
            raise WebhookUrlRefused(
                f"webhook URL refused: {err.message}",
                url=err.fields.get("url"),
                reason=err.fields.get("reason"),
            ) from None
        return url

    def register(
        self,
        ctx: TenantContext,
        store: TenantStore,
        *,
        url: str,
        event_types: Sequence[str],
        description: str = "",
    ) -> tuple[AnyRow, str]:
        """Register an endpoint of ``ctx``'s tenant. Returns it and its signing secret,
        shown this once.

        Raises:
            WebhookUrlRefused: the URL can never be sent to (see :meth:`check_url`).
            InvalidRequest: no event types, or one not in :data:`EVENT_TYPES`.
        """
        self.check_url(url)
        types = _event_types(event_types)
        secret = new_secret()
        endpoint = store.webhooks().create(url=url, event_types=types, description=description, secret=secret)
        self._audit(
            ctx, store, "webhook.create", endpoint["id"], {"url": endpoint["url"], "event_types": types}
        )
        return endpoint, secret

    def delete(self, ctx: TenantContext, store: TenantStore, endpoint_id: str) -> AnyRow:
        """Delete an endpoint, its pending deliveries and its log.

        Raises:
            NotFound: no such endpoint of the tenant.
        """
        endpoint = store.webhooks().delete(endpoint_id)
        self.outbox.forget_endpoint(store.tenant_id, endpoint_id)
        self._audit(ctx, store, "webhook.delete", endpoint_id, {"url": endpoint["url"]})
        return endpoint

    def rotate(
        self, ctx: TenantContext, store: TenantStore, endpoint_id: str, *, overlap_s: float
    ) -> tuple[AnyRow, str]:
        """Give an endpoint a new secret (returned, shown this once); the current one signs
        beside it for ``overlap_s`` seconds (0: it stops now).

        Raises:
            NotFound: no such endpoint of the tenant.
            InvalidRequest: ``overlap_s`` outside 0 to :data:`MAX_OVERLAP_S`.
        """
        if not 0 <= overlap_s <= MAX_OVERLAP_S:
            raise InvalidRequest(f"overlap_s must be 0 to {MAX_OVERLAP_S} seconds", field="overlap_s")
        secret = new_secret()
        until = utcnow() + timedelta(seconds=overlap_s) if overlap_s > 0 else None
        endpoint = store.webhooks().rotate(endpoint_id, secret, overlap_until=until)
        self._audit(ctx, store, "webhook.rotate", endpoint_id, {"overlap_s": overlap_s})
        return endpoint, secret

    def enable(self, ctx: TenantContext, store: TenantStore, endpoint_id: str) -> AnyRow:
        """Make a disabled endpoint active again. Raises :class:`NotFound`."""
        endpoint = store.webhooks().enable(endpoint_id)
        self._audit(ctx, store, "webhook.enable", endpoint_id, {})
        return endpoint

    def ping(self, ctx: TenantContext, store: TenantStore, endpoint_id: str) -> str:
        """Queue a ``webhook.ping`` delivery to the endpoint, due now; returns its id.

        Raises:
            NotFound: no such endpoint of the tenant.
        """
        store.webhooks().get(endpoint_id)
        (delivery_id,) = self.outbox.enqueue(store.tenant_id, [endpoint_id], PING, run_id=None)
        return delivery_id

    def log(self, store: TenantStore, endpoint_id: str, *, limit: int, before: str | None) -> list[AnyRow]:
        """The endpoint's attempts, newest first (see :meth:`WebhookOutbox.log`).

        Raises:
            NotFound: no such endpoint of the tenant.
        """
        store.webhooks().get(endpoint_id)
        return self.outbox.log(store.tenant_id, endpoint_id, limit=limit, before=before)

    def on_settled(
        self, store: TenantStore, run: RunRecord, values: RunRecord, conn: Connection | None
    ) -> None:
        """The outbox write of a settled run (a :data:`~patinox.control.settlement.RunEvents`):
        one delivery of its event per matching active endpoint, in ``conn`` when given."""
        event = "run." + outcome_of(values)
        endpoints = store.webhooks().matching(event, conn)
        if endpoints:
            self.outbox.enqueue(store.tenant_id, endpoints, event, run_id=run["id"], conn=conn)

    @staticmethod
    def _audit(
        ctx: TenantContext, store: TenantStore, action: str, target: str, detail: dict[str, Any]
    ) -> None:
        store.append_audit(actor=ctx.principal, action=action, target=target, outcome="ok", detail=detail)


def _event_types(given: Sequence[str]) -> list[str]:
    types = sorted(set(given))
    unknown = [t for t in types if t not in EVENT_TYPES]
    if not types or unknown:
        raise InvalidRequest(
            f"event_types must name at least one of {', '.join(EVENT_TYPES)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
            field="event_types",
        )
    return types


def _static_check(guard: OutboundGuard, url: str) -> None:
    """Refuse what is plain from ``url`` alone, without resolving a name: the scheme,
    user-info, no host, a literal address the guard refuses, and the name ``localhost``
    (loopback by definition, RFC 6761) unless loopback is allowed."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as err:
        raise EgressRefused(f"not a valid URL: {err}", url=url[:200], reason="invalid_url") from None
    shown = str(parsed.copy_with(userinfo=b"", query=None, fragment=None))
    if parsed.scheme not in guard.policy.schemes:
        raise EgressRefused(
            f"scheme {parsed.scheme!r} is not allowed (https only)", url=shown, reason="scheme"
        )
    if parsed.userinfo:
        raise EgressRefused("URLs with user-info are not allowed", url=shown, reason="userinfo")
    host = parsed.host.lower().rstrip(".")
    if not host:
        raise EgressRefused("the URL has no host", url=shown, reason="invalid_url")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host != "localhost" and not host.endswith(".localhost"):
            return  # a name: resolved and checked when a delivery is sent
        address = ipaddress.ip_address("127.0.0.1")
    why = guard.refusal(address)
    if why is not None:
        raise EgressRefused(f"host {host!r} is {address}, {why}", url=shown, reason="address_not_allowed")


# -- the delivery loop -------------------------------------------------------------------------


class WebhookDispatcher:
    """Claims due deliveries and sends them (see the module docstring).

    Args:
        backend: the deployment's shared database.
        service: the webhook service (its outbox and settings).
        holder: this loop's name in claims (unique per loop).
        guard: the outbound guard (default: one under ``service.settings.policy``; tests
            pass one with their own resolver).
        rng: the jitter's random source.
    """

    def __init__(
        self,
        backend: SqlBackend,
        service: WebhookService,
        *,
        holder: str,
        guard: OutboundGuard | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._backend = backend
        self._service = service
        self._outbox = service.outbox
        self.settings = service.settings
        self.holder = holder
        self._guard = guard or OutboundGuard(self.settings.policy)
        self._rng = rng or random.Random()
        self.wakeup = asyncio.Event()
        #: Attempts made by this loop (for tests and logs).
        self.attempts = 0

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Deliver until ``stop`` is set (or the task is cancelled). A storage failure is
        logged and retried after :attr:`WebhookSettings.poll_s`."""
        stop = stop or asyncio.Event()
        purged_at = -math.inf
        while not stop.is_set():
            if time.monotonic() - purged_at >= _PURGE_EVERY_S:
                purged_at = time.monotonic()
                await self._purge()
            try:
                done = await self.deliver_due()
            except PatinoxError as err:
                log.warning("webhook delivery loop failed; retrying", error=err.code, detail=err.message)
                done = 0
            except Exception:  # a bug must not stop every later delivery of the process
                log.exception("webhook delivery loop failed unexpectedly; retrying")
                done = 0
            if done:
                continue
            self.wakeup.clear()
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wakeup.wait())}
            try:
                await asyncio.wait(waits, timeout=self.settings.poll_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    async def _purge(self) -> None:
        """Delete finished deliveries and log entries older than the retention."""
        cutoff = utcnow() - timedelta(seconds=self.settings.retention_s)
        try:
            await asyncio.to_thread(self._outbox.purge_finished, cutoff)
        except PatinoxError as err:
            log.warning("purging old webhook deliveries failed; retrying later", error=err.code)

    async def deliver_due(self) -> int:
        """Claim up to :attr:`WebhookSettings.batch` due deliveries and send them
        concurrently. Returns how many were claimed.

        Raises:
            StorageError: the claim failed.
        """
        claimed = await asyncio.to_thread(
            self._outbox.claim, self.holder, lease_s=self.settings.lease_s, limit=self.settings.batch
        )
        if claimed:
            await asyncio.gather(*(self._deliver(d) for d in claimed))
        return len(claimed)

    async def _deliver(self, delivery: ClaimedDelivery) -> None:
        try:
            await self._attempt(delivery)
        except PatinoxError as err:  # storage failed: the lease expires and it is taken again
            log.warning(
                "webhook delivery failed to record",
                tenant_id=delivery.tenant_id,
                delivery_id=delivery.id,
                error=err.code,
            )

    async def _attempt(self, delivery: ClaimedDelivery) -> None:
        prepared = await asyncio.to_thread(self._prepare, delivery)
        if prepared is None:
            await asyncio.to_thread(self._outbox.release, delivery)
            return
        if isinstance(prepared, str):
            await asyncio.to_thread(self._outbox.drop, delivery, prepared)
            return
        store, url, secrets, body = prepared
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "Patinox-Webhooks/1",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(secrets, delivery.id, timestamp, body),
        }
        at = utcnow()
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            response = await self._guard.request("POST", url, headers=headers, content=body)
            status = response.status
            if not 200 <= status < 300:
                error = f"the receiver answered {status}"
        except EgressRefused as err:
            error = f"egress_refused ({err.fields.get('reason')}): {err.message}"
        except OutboundFailed as err:
            error = f"outbound_failed ({err.fields.get('reason')}): {err.message}"
        duration_ms = (time.perf_counter() - started) * 1000.0
        self.attempts += 1
        await asyncio.to_thread(self._settle, delivery, store, at, status, error, duration_ms)

    def _prepare(self, d: ClaimedDelivery) -> tuple[TenantStore, str, list[str], bytes] | str | None:
        """The store, URL, secrets and body of a claimed delivery, why it can never be sent
        (it is dropped), or ``None`` when it must wait: its tenant was suspended (or began
        its deletion) since the claim."""
        try:
            tenant = self._backend.get_tenant(d.tenant_id)
            if tenant["state"] in (TenantState.SUSPENDED.value, TenantState.DELETING.value):
                return None
            store = self._backend.acting_on(d.tenant_id)
        except NotFound:
            return "tenant_gone: the tenant was deleted"
        try:
            endpoint, secrets = store.webhooks().secrets(d.endpoint_id)
        except NotFound:
            return "endpoint_gone: the endpoint was deleted"
        except (TenantKeysDestroyed, DecryptionFailed) as err:
            return f"secret_unreadable: {err.code}"
        if endpoint["state"] != "active" and d.event_type != PING:
            return "endpoint_disabled: the endpoint is disabled"
        try:
            body = self._body(store, d)
        except NotFound:
            return "run_gone: the run no longer exists"
        except (TenantKeysDestroyed, DecryptionFailed) as err:
            return f"run_unreadable: {err.code}"
        return store, str(endpoint["url"]), secrets, body

    @staticmethod
    def _body(store: TenantStore, d: ClaimedDelivery) -> bytes:
        """The JSON body: ``type``, ``timestamp`` (the event's, ISO 8601 UTC) and ``data``
        (the run: ids, status, tokens, output or error; for a ping, the endpoint id)."""
        data: dict[str, Any]
        if d.run_id is None:
            data = {"endpoint_id": d.endpoint_id}
        else:
            run = store.get_run(d.run_id)
            data = {
                "run_id": run["id"],
                "agent_id": run["agent_id"],
                "status": run["status"],
                "mode": run["mode"],
                "model": run["model"],
                "simulated": bool(run["simulated"]),
                "output": run.get("output"),
                "error": run.get("error"),
                "input_tokens": run.get("input_tokens", 0),
                "output_tokens": run.get("output_tokens", 0),
                "tool_calls": run.get("tool_calls", 0),
                "created_at": _iso(run.get("created_at")),
                "finished_at": _iso(run.get("finished_at")),
            }
        event = {"type": d.event_type, "timestamp": _iso(d.created_at), "data": data}
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def _settle(
        self,
        d: ClaimedDelivery,
        store: TenantStore,
        at: datetime,
        status: int | None,
        error: str | None,
        duration_ms: float,
    ) -> None:
        """Record the attempt and move the delivery on; count it on the endpoint, which a
        run of failures disables (audited)."""
        ok = error is None
        disabled = False
        with contextlib.suppress(NotFound):  # deleted meanwhile: its deliveries go with it
            disabled = store.webhooks().record_attempt(
                d.endpoint_id, ok=ok, disable_after=self.settings.disable_after
            )
        if disabled:
            store.append_audit(
                actor="system",
                action="webhook.disable",
                target=d.endpoint_id,
                outcome="ok",
                detail={"consecutive_failures": self.settings.disable_after, "last_error": error},
            )
            log.warning(
                "webhook endpoint disabled after consecutive failures",
                tenant_id=d.tenant_id,
                endpoint_id=d.endpoint_id,
                failures=self.settings.disable_after,
            )
        if ok:
            state, next_at = "succeeded", None
        elif disabled or d.attempt >= self.settings.max_attempts:
            state, next_at = "failed", None
        else:
            state = "pending"
            next_at = utcnow() + timedelta(seconds=backoff_s(d.attempt, self.settings, self._rng))
        self._outbox.record(
            d,
            at=at,
            status_code=status,
            error=error,
            duration_ms=duration_ms,
            state=state,
            next_attempt_at=next_at,
        )


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None
