"""Authentication, tenant context, request rate limit and body-size limit, as one ASGI layer.

For ``/v1/...`` the key must be a tenant key: the tenant is resolved from it, its rate
limit is hit, and the rest of the request runs inside ``tenant_scope(ctx)``; the scope is
left when the response is done, so no request can start with another's tenant. For
``/admin/...`` the key must be an operator key. Anything else is public (health, docs).
Refusals are answered here, before routing, as JSON ``{"error": {...}}``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patinox.api._hosts import check_admin_host, check_host_of, check_tenant_host
from patinox.api._idempotency import REQUEST_BODY, is_replay
from patinox.api._logging import record_failure
from patinox.control import OperatorPrincipal
from patinox.control.admission import changing_level, moving_error
from patinox.errors import (
    AuthenticationFailed,
    InvalidRequest,
    PatinoxError,
    PermissionDenied,
    RateLimited,
    TenantSuspended,
)
from patinox.limits import RateLimitState, ratelimit_headers
from patinox.runtime import Runtime
from patinox.tenancy import TenantContext, clear_inherited_tenant, tenant_scope

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The routes that start a run (``POST /v1/agents/{id}/runs``, ``POST /v1/threads/{id}/runs``):
#: during a change of isolation level they go on to admission, which queues an asynchronous
#: run and refuses a synchronous one (503 ``tenant_moving``) after counting the agent's rate.
_RUN_PATH = re.compile(r"/v1/(?:agents|threads)/[^/]+/runs")
#: Key in the ASGI scope's ``state`` of the request's rate-limit states
#: (``list[RateLimitState]``): the tenant's and the key's, to which a route appends its own.
RATE_STATES = "patinox.rate_states"


def error_response_parts(
    err: PatinoxError, *, rate_headers: bool = True
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) of an error; 429s and 503s carry ``Retry-After``
    (whole seconds, rounded up: a retry after it is never early), rate-limit refusals the
    ``RateLimit`` / ``RateLimit-Policy`` headers unless ``rate_headers`` is false (inside a
    tenant request, whose middleware sends those fields for every policy, the refused one
    included)."""
    headers: dict[str, str] = {}
    if err.http_status in (429, 503) and err.retry_after_s is not None:
        headers["Retry-After"] = str(math.ceil(err.retry_after_s))
    if rate_headers and isinstance(err, RateLimited) and err.policy is not None:
        headers.update(ratelimit_headers(RateLimitState.from_refusal(err)))
    if err.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return err.http_status, {"error": err.to_dict()}, headers


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    # Encoded as Starlette's JSONResponse encodes every other error body.
    payload = JSONResponse(body).body
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class _BodyTooLarge(PatinoxError):
    code = "payload_too_large"
    http_status = 413


class TenancyMiddleware:
    """See the module docstring."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime
        #: Key id -> the tenant it authenticated as (only which turn its next
        #: authentication waits for: every request is authenticated anew).
        self._key_tenants: dict[str, str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        clear_inherited_tenant()
        if (
            "\x00" in scope["path"]
            or b"%00" in scope.get("query_string", b"")
            or b"\x00" in scope.get("query_string", b"")
        ):
            await _send_json(
                send,
                422,
                {
                    "error": {
                        "code": "invalid_request",
                        "message": "NUL characters are not allowed",
                        "details": {},
                    }
                },
                {},
            )
            return
        path: str = scope["path"]
        tenant_route = path.startswith("/v1/") or path == "/v1"
        admin_route = path.startswith("/admin/") or path == "/admin"
        try:
            receive = await self._limit_body(scope, receive)
            if not (tenant_route or admin_route):
                await self.app(scope, receive, send)
                return
            # The key's lookup and the request-rate hits are storage calls: made where the
            # runtime makes them (storage threads on PostgreSQL), as one call, in the turn of
            # the tenant the key belonged to when last seen here (else the system's), so a
            # busy tenant's requests do not hold up another tenant's authentication.
            key_id = _key_id(scope)
            flow = self._key_tenants.get(key_id) if key_id else None
            if flow is None:
                principal, states = await self.rt.storage.system(
                    self._authenticate, scope, path, tenant_route
                )
            else:
                principal, states = await self.rt.storage.call(
                    flow, self._authenticate, scope, path, tenant_route
                )
            if key_id and isinstance(principal, TenantContext) and flow != principal.tenant_id:
                if len(self._key_tenants) >= _KEY_FLOWS_MAX:
                    self._key_tenants.clear()
                self._key_tenants[key_id] = principal.tenant_id
            # Read by the operator routes and the request log (tenant id, key id).
            scope.setdefault("state", {})["principal"] = principal
            if admin_route:
                if not isinstance(principal, OperatorPrincipal):
                    raise PermissionDenied("admin routes need an operator key", scope="admin")
                await self.app(scope, receive, send)
                return
            if not isinstance(principal, TenantContext):
                raise PermissionDenied("tenant routes need a tenant key; operator keys act through /admin")
        except PatinoxError as err:
            record_failure(scope, err)
            await _send_json(send, *error_response_parts(err))
            return
        # A route may add its own policy (a run adds the agent's) to this list; the
        # headers are built from it when the response starts.
        scope.setdefault("state", {})[RATE_STATES] = states
        with tenant_scope(principal):
            await self.app(scope, receive, _with_rate_headers(send, states))

    def _authenticate(
        self, scope: Scope, path: str, tenant_route: bool
    ) -> tuple[TenantContext | OperatorPrincipal, list[RateLimitState]]:
        """The request's principal and, for a tenant key on a tenant route, its tenant's and
        key's request-rate states (hit now) after the tenant's write hold is checked.

        Raises:
            AuthenticationFailed: no key, or not a known live one, or one used on another
                tenant's host name (:mod:`patinox.api._hosts`).
            NotFound: an ``/admin`` route on another host than the base host.
            RateLimited: the tenant's or the key's request rate is spent.
            TenantMoving: a write to a tenant whose writes are held.
        """
        if not tenant_route:
            check_admin_host(self.rt.endpoints, scope)
        try:
            principal = self.rt.keys.authenticate(_bearer(scope))
        except TenantSuspended as err:  # on another tenant's host, a wrong key: say nothing more
            check_host_of(self.rt.endpoints, scope, err.fields.get("tenant_id"))
            raise
        check_tenant_host(self.rt.endpoints, scope, principal)  # tenant endpoints: api/_hosts.py
        # Known before the rate hits, so a failure of the limit store is logged with it.
        scope.setdefault("state", {})["principal"] = principal
        if not tenant_route or not isinstance(principal, TenantContext):
            return principal, []
        limits, tid = principal.limits, principal.tenant_id
        # An Idempotency-Key retry answered from the tenant's records counts against no rate.
        replay = is_replay(scope, lambda: self.rt.backend.tenant_store(principal))
        states = (
            []
            if replay
            else [
                self.rt.rate.hit("tenant", limits.requests_per_minute, tenant_id=tid),
                self.rt.rate.hit(f"key:{principal.principal}", limits.per_key_rpm, tenant_id=tid),
            ]
        )
        # A storage move holds every write; a change of isolation level only runs
        # (admission refuses a synchronous one and queues an asynchronous one).
        if (
            principal.writes_held
            and scope["method"] not in _READ_METHODS
            and not (_RUN_PATH.fullmatch(path) and changing_level(self.rt.backend, tid))
        ):
            raise moving_error(self.rt.backend, tid)
        return principal, states

    async def _limit_body(self, scope: Scope, receive: Receive) -> Receive:
        """Refuse bodies over the limit (413) or holding a NUL character (422
        ``invalid_request``) before any handler sees them.

        A declared ``Content-Length`` is checked at once (the server enforces it). The body
        is read here, up to the limit, and replayed to the app.
        """
        limit = self.rt.settings.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    raise _BodyTooLarge(f"request body over {limit} bytes", limit_bytes=limit)
                break
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                raise _BodyTooLarge(f"request body over {limit} bytes", limit_bytes=limit)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        scope.setdefault("state", {})[REQUEST_BODY] = body  # an Idempotency-Key's fingerprint
        if _spells_nul(body):
            # PostgreSQL text cannot hold one (SQLite can): refused here, every deployment
            # answers alike, whichever field it is in.
            raise InvalidRequest("NUL characters are not allowed", field="body")
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        return replayed


_NUL_ESCAPE = b"\\u0000"


def _spells_nul(body: bytes) -> bool:
    """True when a JSON request body holds a NUL character: the escape ``\\u0000`` (not
    itself escaped, i.e. after an even number of backslashes) or a raw zero byte (UTF-8
    JSON text holds none; the UTF-16 and UTF-32 encodings that ``json.loads`` would also
    read are refused with it)."""
    if b"\x00" in body:
        return True
    at = body.find(_NUL_ESCAPE)
    while at != -1:
        start = at
        while start > 0 and body[start - 1] == 0x5C:  # backslashes before the escape's own
            start -= 1
        if (at - start) % 2 == 0:
            return True
        at = body.find(_NUL_ESCAPE, at + 1)
    return False


def _with_rate_headers(send: Send, states: list[RateLimitState]) -> Send:
    """``send`` that adds to the response start one ``RateLimit-Policy`` and one
    ``RateLimit`` field naming every policy in ``states`` (as they are when the response
    starts; the app's error handler leaves those fields to this)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            added = [(k.lower().encode(), v.encode()) for k, v in ratelimit_headers(*states).items()]
            message = {**message, "headers": [*message.get("headers", []), *added]}
        await send(message)

    return sending


#: Most key ids whose tenant is remembered for the order of authentications (then forgotten).
_KEY_FLOWS_MAX = 65_536


def _key_id(scope: Scope) -> str | None:
    """The id part of the request's API key (``ptx_<id>_<secret>``), unverified; ``None``
    when it has none."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            parts: list[bytes] = value.split(b"_", 2)
            if len(parts) == 3 and len(parts[1]) == 12:
                return parts[1].decode("latin-1")
            return None
    return None


def _bearer(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text: str = value.decode("latin-1")
            kind, _, token = text.partition(" ")
            if kind.lower() == "bearer" and token.strip():
                return token.strip()
            break
    raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
