"""One structured log event per HTTP request, a request id on each, and dependency failures.

:class:`RequestLogMiddleware` is the outermost layer of the app. For every HTTP request it

- takes the caller's ``X-Request-ID`` when it is 1-64 of ``A-Z a-z 0-9 . _ : -`` (the
  first such header), or makes one (unique per process start: a random prefix and a
  counter), and returns it in the ``X-Request-ID`` response header;
- logs one ``request`` event (level ``info``) when the response is done, with
  ``request_id``, ``method``, ``path`` (without the query string, whose values such as a
  mis-sent key or a ``since`` filter are never logged; cut to 256 characters), ``route``
  (the matched route's template, e.g. ``/v1/agents/{agent_id}/runs``), ``status``,
  ``duration_ms``, and when known ``tenant_id``, ``key_id`` (the id of the API key, never
  the key or its hash) and ``error`` (the code of an error response);
- logs one ``dependency_failed`` event (level ``error``) when the request failed because a
  dependency did (a :class:`~patinox.errors.StorageError`: ``storage_error`` for the
  database, ``limit_store_unavailable`` for the rate-limit store), with the fields above
  (``error`` is that code) and the underlying exception's type (``cause_type``) and the first line
  of its message (``cause``, at most 200 characters; the lines after it can hold SQL
  parameters or row values, and no body is ever logged);
- logs ``unhandled_exception`` (level ``error``, the exception's type only: the server's
  own log has the traceback) when the app raised.

Error handlers note on the request the error its response was made from with
:func:`record_failure`. The work per request is a header scan, a few dict operations and
one log call; level filtering happens in that call (see :mod:`patinox._logs`).
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patinox.control import OperatorPrincipal
from patinox.errors import PatinoxError, StorageError
from patinox.tenancy import TenantContext

__all__ = ["REQUEST_ID_HEADER", "RequestLogMiddleware", "failure_cause", "record_failure"]

#: Request and response header carrying the request id.
REQUEST_ID_HEADER = "X-Request-ID"
_HEADER = REQUEST_ID_HEADER.lower().encode()
#: An incoming request id is kept when it matches this; otherwise a new one is made.
_SAFE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
#: Key in the ASGI scope's ``state``: the :class:`PatinoxError` an error response was made from.
_FAILURE = "patinox.failure"
#: Key in the ASGI scope's ``state``: the authenticated principal, a ``TenantContext`` or an
#: ``OperatorPrincipal`` (set by :class:`~patinox.api._middleware.TenancyMiddleware`).
_PRINCIPAL = "principal"
_MAX_PATH = 256
_MAX_CAUSE = 200

log = structlog.get_logger("patinox.http")


def record_failure(scope: Scope, err: PatinoxError) -> None:
    """Note on the request ``err``, the error its response is made from (the request's log
    event names its code; a dependency failure is logged on its own)."""
    state = scope.get("state")
    if state is not None:
        state[_FAILURE] = err


def failure_cause(err: BaseException) -> tuple[str, str]:
    """(type name, first line of the message, at most 200 characters) of what caused
    ``err``: its chained driver error (a SQLAlchemy error's own DBAPI error), or ``err``
    itself. Only the first line: the lines after it can hold SQL parameters or row values."""
    cause: BaseException = err.__cause__ or err
    orig = getattr(cause, "orig", None)
    if isinstance(orig, BaseException):
        cause = orig
    return type(cause).__name__, str(cause).partition("\n")[0][:_MAX_CAUSE]


class RequestLogMiddleware:
    """See the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._prefix = secrets.token_hex(6) + "-"
        self._counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._request_id(scope)
        header = (_HEADER, request_id.encode("ascii"))
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        scope.setdefault("state", {})
        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # logged with its type; the server's own log has the traceback
            log.error(
                "unhandled_exception", request_id=request_id, path=_path(scope), error_type=type(exc).__name__
            )
            raise
        finally:
            _log_request(scope, request_id, status, round((time.perf_counter() - started) * 1000, 2))

    def _request_id(self, scope: Scope) -> str:
        """The caller's ``X-Request-ID`` when it is safe, else a new one."""
        for name, value in scope["headers"]:
            if name == _HEADER:
                if _SAFE_ID.fullmatch(value):
                    return str(value.decode("ascii"))
                break
        return f"{self._prefix}{next(self._counter):x}"


def _log_request(scope: Scope, request_id: str, status: int, duration_ms: float) -> None:
    """The ``request`` event, and ``dependency_failed`` before it when a dependency failed."""
    state: dict[str, Any] = scope["state"]
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": scope["method"],
        "path": _path(scope),
        "status": status,
        "duration_ms": duration_ms,
    }
    route = scope.get("route")
    if route is not None:
        fields["route"] = getattr(route, "path", None)
    principal = state.get(_PRINCIPAL)
    if isinstance(principal, TenantContext):
        fields["tenant_id"] = principal.tenant_id
        fields["key_id"] = principal.principal
    elif isinstance(principal, OperatorPrincipal):
        fields["key_id"] = principal.key_id
    failure = state.get(_FAILURE)
    if failure is not None:
        fields["error"] = failure.code
        if isinstance(failure, StorageError):
            cause_type, cause = failure_cause(failure)
            log.error("dependency_failed", cause_type=cause_type, cause=cause, **fields)
    log.info("request", **fields)


def _path(scope: Scope) -> str:
    path: str = scope["path"]
    return path if len(path) <= _MAX_PATH else path[:_MAX_PATH] + "..."
