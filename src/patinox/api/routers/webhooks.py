"""Webhook routes of a tenant (``/v1/webhooks``): register an HTTPS endpoint for run
events, list, get, delete, rotate its signing secret with an overlap, enable it again
after it was disabled, send it a test event (``ping``), and read its delivery log.

Writes take the ``webhooks:write`` scope, reads ``read``. A signing secret is answered
once, by the registration and by each rotation, never again. Another tenant's endpoint
answers 404 like a missing one. See :mod:`patinox.control.webhooks` for delivery and
signing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from patinox.api import schemas as o
from patinox.api._deps import RT, Reader, Store, WebhookWriter
from patinox.api._idempotency import Created, idempotent
from patinox.control.webhooks import EVENT_TYPES, MAX_OVERLAP_S, WebhookService
from patinox.errors import ConfigurationError

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": o.ErrorOut, "description": "`not_found`: no such endpoint of the calling tenant"}
}
_REFUSED: dict[int | str, dict[str, Any]] = {
    422: {
        "model": o.ErrorOut,
        "description": "`webhook_url_refused` (not https, user-info, a literal loopback, private or "
        "link-local address the operator did not allow), or `invalid_request` (unknown event type)",
    }
}


class WebhookCreate(BaseModel):
    """An endpoint to register."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2048, description="an https URL")
    event_types: list[str] = Field(
        min_length=1, max_length=len(EVENT_TYPES), description=f"among {', '.join(EVENT_TYPES)}"
    )
    description: str = Field(default="", max_length=200)


class WebhookRotate(BaseModel):
    """A rotation of an endpoint's signing secret."""

    model_config = ConfigDict(extra="forbid")
    overlap_s: float = Field(
        default=86_400.0,
        ge=0,
        le=MAX_OVERLAP_S,
        description="seconds the previous secret keeps signing beside the new one (0: it stops now)",
    )


class WebhookOut(BaseModel):
    """A webhook endpoint (never its secret)."""

    id: str
    url: str
    event_types: list[str]
    description: str
    state: str = Field(description="active | disabled (after consecutive failed attempts)")
    consecutive_failures: int
    disabled_at: datetime | None = None
    previous_secret_expires_at: datetime | None = Field(
        default=None, description="until when the previous secret signs too (a rotation's overlap)"
    )
    created_at: datetime
    updated_at: datetime


class WebhookSecretOut(WebhookOut):
    """An endpoint with its signing secret, answered once (registration, rotation)."""

    secret: str = Field(description="the signing secret (whsec_...); shown this once, store it now")


class WebhookPingOut(BaseModel):
    """A queued test delivery."""

    delivery_id: str = Field(description="its webhook-id header")


class WebhookAttemptOut(BaseModel):
    """One attempt to deliver an event to the endpoint."""

    id: str
    delivery_id: str = Field(description="the delivery's webhook-id, the same on every retry")
    event_type: str
    attempt: int = Field(description="1 for the first attempt of the delivery, then 2, 3, ...")
    at: datetime = Field(description="when the attempt started (UTC)")
    status_code: int | None = Field(description="the receiver's HTTP status; null when none answered")
    error: str | None = Field(description="why the attempt failed; null when it succeeded")
    duration_ms: float = Field(description="milliseconds")


def _service(rt: RT) -> WebhookService:
    if rt.webhooks is None:
        raise ConfigurationError("this deployment was built without webhooks")
    return rt.webhooks


@router.post("", status_code=201, response_model=WebhookSecretOut, responses=_REFUSED)
async def create_webhook(
    body: WebhookCreate, ctx: WebhookWriter, rt: RT, store: Store, request: Request
) -> Response:
    """Register an endpoint of the calling tenant; answers its signing secret, this once.
    Takes ``Idempotency-Key``."""
    service = _service(rt)

    async def create() -> Created:
        endpoint, secret = service.register(
            ctx, store, url=body.url, event_types=body.event_types, description=body.description
        )
        return (
            201,
            WebhookSecretOut(**endpoint, secret=secret),
            {"Location": f"/v1/webhooks/{endpoint['id']}"},
        )

    return await idempotent(request.scope, lambda: store, create)


@router.get("")
def list_webhooks(_: Reader, store: Store) -> list[WebhookOut]:
    """The calling tenant's endpoints, oldest first."""
    return [WebhookOut(**e) for e in store.webhooks().all()]


@router.get("/{endpoint_id}", responses=_NOT_FOUND)
def get_webhook(endpoint_id: str, _: Reader, store: Store) -> WebhookOut:
    return WebhookOut(**store.webhooks().get(endpoint_id))


@router.delete("/{endpoint_id}", responses=_NOT_FOUND)
def delete_webhook(endpoint_id: str, ctx: WebhookWriter, rt: RT, store: Store) -> WebhookOut:
    """Delete an endpoint with its pending deliveries and its delivery log."""
    return WebhookOut(**_service(rt).delete(ctx, store, endpoint_id))


@router.post("/{endpoint_id}/rotate", response_model=WebhookSecretOut, responses=_NOT_FOUND)
async def rotate_webhook_secret(
    endpoint_id: str, body: WebhookRotate, ctx: WebhookWriter, rt: RT, store: Store, request: Request
) -> Response:
    """A new signing secret, answered this once; the previous one signs beside it (a second
    signature in ``webhook-signature``) for ``overlap_s`` seconds. Takes ``Idempotency-Key``
    (a retry answers the same new secret)."""
    service = _service(rt)

    async def rotate() -> Created:
        endpoint, secret = service.rotate(ctx, store, endpoint_id, overlap_s=body.overlap_s)
        return 200, WebhookSecretOut(**endpoint, secret=secret), {}

    return await idempotent(request.scope, lambda: store, rotate)


@router.post("/{endpoint_id}/enable", responses=_NOT_FOUND)
def enable_webhook(endpoint_id: str, ctx: WebhookWriter, rt: RT, store: Store) -> WebhookOut:
    """Make an endpoint disabled after consecutive failures active again."""
    return WebhookOut(**_service(rt).enable(ctx, store, endpoint_id))


@router.post("/{endpoint_id}/ping", status_code=202, response_model=WebhookPingOut, responses=_NOT_FOUND)
async def ping_webhook(
    endpoint_id: str, ctx: WebhookWriter, rt: RT, store: Store, request: Request
) -> Response:
    """Queue a ``webhook.ping`` event to the endpoint (sent like any delivery, logged in its
    delivery log). Takes ``Idempotency-Key``."""
    service = _service(rt)

    async def ping() -> Created:
        return 202, WebhookPingOut(delivery_id=service.ping(ctx, store, endpoint_id)), {}

    return await idempotent(request.scope, lambda: store, ping)


@router.get("/{endpoint_id}/deliveries", responses=_NOT_FOUND)
def list_webhook_attempts(
    endpoint_id: str,
    _: Reader,
    rt: RT,
    store: Store,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[
        str | None, Query(max_length=40, description="an attempt id: attempts older than it")
    ] = None,
) -> list[WebhookAttemptOut]:
    """The endpoint's delivery log: one entry per attempt, newest first, ``limit`` at most.
    When more may follow, ``Link: <...?before=ID>; rel="next"``."""
    rows: list[dict[str, Any]] = _service(rt).log(store, endpoint_id, limit=limit, before=before)
    if len(rows) == limit:
        query = urlencode({"limit": limit, "before": rows[-1]["id"]})
        response.headers["Link"] = f'</v1/webhooks/{endpoint_id}/deliveries?{query}>; rel="next"'
    return [WebhookAttemptOut(**r) for r in rows]
