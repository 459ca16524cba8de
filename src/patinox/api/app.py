"""The HTTP API (FastAPI): operator routes under ``/admin``, tenant routes under ``/v1``;
``/healthz`` (liveness) and ``/readyz`` (readiness, see :mod:`patinox.api._health`) need no key.

Errors are JSON ``{"error": {"code", "message", "details"}}`` with a stable ``code``.
A foreign tenant's object id answers exactly like a missing one (404 ``not_found``).
Every request is logged with a request id (:mod:`patinox.api._logging`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from patinox.api import schemas as o
from patinox.api._deps import BEARER_SCHEME, BEARER_SCHEME_NAME
from patinox.api._health import Readiness
from patinox.api._logging import RequestLogMiddleware, record_failure
from patinox.api._middleware import RATE_STATES, TenancyMiddleware, error_response_parts
from patinox.api._openai import OPENAI_ERRORS, OpenAIErrorShape
from patinox.api.routers import (
    admin,
    config,
    endpoints,
    keys,
    openai,
    secrets,
    tenant,
    threads,
    tls,
    webhooks,
)
from patinox.errors import PatinoxError
from patinox.runtime import Runtime, Settings

#: Error responses of every ``/admin`` and ``/v1`` route, as the OpenAPI document lists them.
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": o.ErrorOut, "description": description}
    for status, description in (
        (400, "`malformed_json`: the request body is not valid JSON"),
        (401, "`unauthenticated`: no, malformed, wrong or revoked API key"),
        (403, "`forbidden` (the key lacks the scope or kind), `tenant_suspended` or `model_not_allowed`"),
        (404, "`not_found`: missing, or another tenant's object"),
        (409, "`already_exists` or `invalid_transition`"),
        (413, "`payload_too_large`: the request body is over the limit"),
        (
            422,
            "`invalid_request`, `unknown_model`, `unknown_tool`, `isolation_unavailable` or "
            "`exceeds_budget` (a run larger than the whole daily token budget)",
        ),
        (429, "`rate_limited`, `concurrency_limited` or `quota_exceeded`, with `Retry-After` (seconds)"),
        (
            503,
            "`storage_error` (the database failed), `limit_store_unavailable` (the rate-limit store "
            "failed), `tenant_moving` or `overloaded` (the server is at capacity and this tenant "
            "has its fair share of it; the last two with `Retry-After`, seconds)",
        ),
    )
}


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the ASGI app. Give ``settings`` (storage opened at start-up) or a built ``runtime``."""
    if runtime is None:
        if settings is None:
            raise ValueError("give settings or runtime")
        runtime = Runtime.build(settings)
    rt = runtime
    readiness = Readiness(rt)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Queued runs are durable: an in-process worker executes them (unless the
        # deployment runs `patinox worker` processes only), beside any other workers.
        background = [asyncio.create_task(rt.runs.watch_tenants())]
        if rt.runs.admission is not None:  # learns this process's capacity as it serves
            background.append(asyncio.create_task(rt.runs.admission.watch(rt.runs.calls.wait_window)))
        if rt.settings.embedded_workers > 0:
            readiness.worker = rt.worker(concurrency=rt.settings.embedded_workers)
            background.append(asyncio.create_task(readiness.worker.run()))
        yield
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await rt.runs.shutdown()

    app = FastAPI(
        title="Patinox",
        version="0.1.0",
        lifespan=lifespan,
        description="Multi-tenant runtime for AI agents. Models named `simulated...` "
        "are Patinox's offline simulated LLM, not a real model.",
    )
    app.state.runtime = rt
    app.add_middleware(TenancyMiddleware, runtime=rt)
    # Around the tenancy layer, so its refusals on the OpenAI-compatible routes take
    # OpenAI's error shape too.
    app.add_middleware(OpenAIErrorShape)
    # Added last, so outermost: it sees every request, refusals of the tenancy layer included.
    app.add_middleware(RequestLogMiddleware)
    _install_error_handlers(app)
    # Error responses are listed on these routes only. Routes are matched in order: the
    # run route, then tenant routes, then operator routes.
    app.add_api_route(
        tenant.RUN_PATH,
        tenant.create_run,
        methods=["POST"],
        tags=["tenant"],
        response_model=o.RunOut,
        responses={**_ERRORS, **tenant.RUN_RESPONSES},
    )
    for router in (
        tenant.router,
        admin.router,
        config.router,
        keys.router,
        secrets.router,
        endpoints.router,
        webhooks.router,
    ):
        app.include_router(router, responses=_ERRORS)
    app.include_router(threads.router, responses=_ERRORS)
    app.include_router(tls.router, responses=_ERRORS)
    app.include_router(openai.router, responses=OPENAI_ERRORS)
    _declare_bearer_auth(app)

    @app.get("/healthz", tags=["public"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers HTTP. Checks no dependency (see ``/readyz``)."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["public"],
        response_model=o.ReadinessOut,
        responses={503: {"model": o.ReadinessOut, "description": "a dependency is failing"}},
    )
    async def readyz() -> JSONResponse:
        """Readiness: `200` when the database, the rate-limit store and the embedded queue
        worker all work, `503` when any fails; each check gets about a second."""
        ready, checks = await readiness.check()
        body = {"status": "ready" if ready else "not_ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    return app


def _declare_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer scheme on every ``/admin`` and ``/v1`` operation of the OpenAPI
    document (FastAPI's documented way to extend it: replace ``app.openapi``). The
    middleware does the authentication, so no route carries a security dependency that
    would run on every request only to be ignored."""

    generate = app.openapi  # FastAPI's own: builds the document once, then returns it cached

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        doc = generate()
        if first:
            schemes = doc.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes[BEARER_SCHEME_NAME] = dict(BEARER_SCHEME)
            for path, item in doc.get("paths", {}).items():
                if path.startswith(("/admin", "/v1")):
                    for op in item.values():
                        op["security"] = [{BEARER_SCHEME_NAME: []}]
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PatinoxError)
    async def on_patinox(request: Request, err: PatinoxError) -> JSONResponse:
        # In a tenant request the middleware sends the RateLimit fields of every policy.
        in_tenant_request = RATE_STATES in request.scope.get("state", {})
        record_failure(request.scope, err)
        status, body, headers = error_response_parts(err, rate_headers=not in_tenant_request)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": e.get("msg")} for e in err.errors()
        ]
        if any(e["type"] == "json_invalid" for e in errors):
            body = {
                "code": "malformed_json",
                "message": "the request body is not valid JSON",
                "details": {"errors": errors},
            }
            return JSONResponse({"error": body}, status_code=400)
        body = {
            "code": "invalid_request",
            "message": "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors),
            "details": {"errors": errors},
        }
        return JSONResponse({"error": body}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "malformed_json"}
        message = str(err.detail)
        headers = getattr(err, "headers", None)
        if err.status_code == 400:
            # FastAPI's answer to a body json.loads could not parse for another reason than
            # a syntax error (nested deeper than it recurses): a malformed body all the same.
            message = "the request body is not valid JSON (or nests too deeply to parse)"
        elif err.status_code == 405:
            # Starlette names the methods of the first route on the path only.
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        body = {
            "code": codes.get(err.status_code, f"http_{err.status_code}"),
            "message": message,
            "details": {},
        }
        return JSONResponse({"error": body}, status_code=err.status_code, headers=headers)


#: Methods a 405's ``Allow`` may name (those of RFC 9110 that a route can declare).
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route of the app allows on the request's path, for ``Allow``:
    each method is tried against every route (included routers too) as the router would."""
    routes = request.app.router.routes
    allowed = (
        m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)
    )
    return ", ".join(allowed)
