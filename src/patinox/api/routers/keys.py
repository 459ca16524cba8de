"""API key routes: the operator's for any tenant (``/admin/tenants/{id}/keys``) and a
tenant's own (``/v1/keys``, scope ``keys:write``: a key never creates or rotates a key
with a scope it does not hold itself). Listings never show a secret or its hash."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from patinox.api import schemas as o
from patinox.api._deps import RT, KeyWriter, Operator
from patinox.api._idempotency import Created, idempotent
from patinox.control import IssuedKey

router = APIRouter(tags=["keys"])


class KeyCreate(BaseModel):
    """An API key to create."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    scopes: list[str] | None = Field(
        default=None,
        description="default: agents:write, runs:write, read (a tenant key: those of them it holds); "
        "also keys:write, secrets:write, config:write",
    )
    expires_at: AwareDatetime | None = Field(
        default=None, description="when it stops working; default: never"
    )


class KeyRotate(BaseModel):
    """A rotation: a new key with the old one's name and scopes; the old one works on for
    ``overlap_s`` seconds."""

    model_config = ConfigDict(extra="forbid")
    overlap_s: float = Field(
        default=3600.0, ge=0, le=30 * 86_400, description="seconds (0: the old key stops now)"
    )
    expires_at: AwareDatetime | None = Field(default=None, description="the new key's expiry; default: never")


def _issued(issued: IssuedKey) -> o.IssuedKeyOut:
    return o.IssuedKeyOut(**issued.record, key=issued.secret)


async def _once(request: Request, rt: RT, tenant_id: str, issue: Callable[[], IssuedKey]) -> Response:
    """``issue()`` answered 201, once per ``Idempotency-Key`` of the tenant (see
    :mod:`patinox.api._idempotency`): a retry answers the same key, secret included."""

    async def create() -> Created:
        return 201, _issued(issue()), {}

    return await idempotent(request.scope, lambda: rt.backend.acting_on(tenant_id), create)


# --- the operator's -------------------------------------------------------------------


@router.post(
    "/admin/tenants/{tenant_id}/keys", status_code=201, tags=["admin"], response_model=o.IssuedKeyOut
)
async def create_key(tenant_id: str, body: KeyCreate, op: Operator, rt: RT, request: Request) -> Response:
    return await _once(
        request,
        rt,
        tenant_id,
        lambda: rt.keys.create(
            tenant_id=tenant_id,
            name=body.name,
            scopes=body.scopes,
            actor=op.key_id,
            expires_at=body.expires_at,
        ),
    )


@router.get("/admin/tenants/{tenant_id}/keys", tags=["admin"])
def list_keys(tenant_id: str, _: Operator, rt: RT) -> list[o.KeyOut]:
    rt.tenants.get(tenant_id)
    return [o.KeyOut(**k) for k in rt.keys.keys_of(tenant_id)]


@router.post(
    "/admin/tenants/{tenant_id}/keys/{key_id}/rotate",
    status_code=201,
    tags=["admin"],
    response_model=o.IssuedKeyOut,
)
async def rotate_key(
    tenant_id: str, key_id: str, body: KeyRotate, op: Operator, rt: RT, request: Request
) -> Response:
    return await _once(
        request,
        rt,
        tenant_id,
        lambda: rt.keys.rotate(
            key_id, tenant_id=tenant_id, actor=op.key_id, overlap_s=body.overlap_s, expires_at=body.expires_at
        ),
    )


@router.delete("/admin/tenants/{tenant_id}/keys/{key_id}", tags=["admin"])
def revoke_key(tenant_id: str, key_id: str, op: Operator, rt: RT) -> o.KeyOut:
    return o.KeyOut(**rt.keys.revoke(key_id, tenant_id=tenant_id, actor=op.key_id))


# --- a tenant's own -------------------------------------------------------------------


@router.post("/v1/keys", status_code=201, tags=["tenant"], response_model=o.IssuedKeyOut)
async def create_own_key(body: KeyCreate, ctx: KeyWriter, rt: RT, request: Request) -> Response:
    """Create a key of the calling tenant, with scopes the calling key holds."""
    return await _once(
        request,
        rt,
        ctx.tenant_id,
        lambda: rt.keys.create(
            tenant_id=ctx.tenant_id,
            name=body.name,
            scopes=body.scopes,
            actor=ctx.principal,
            expires_at=body.expires_at,
            within=ctx.scopes,
            by_key=ctx.principal,
        ),
    )


@router.get("/v1/keys", tags=["tenant"])
def list_own_keys(ctx: KeyWriter, rt: RT) -> list[o.KeyOut]:
    """The calling tenant's keys, revoked and expired ones included; no secrets."""
    return [o.KeyOut(**k) for k in rt.keys.keys_of(ctx.tenant_id)]


@router.post("/v1/keys/{key_id}/rotate", status_code=201, tags=["tenant"], response_model=o.IssuedKeyOut)
async def rotate_own_key(key_id: str, body: KeyRotate, ctx: KeyWriter, rt: RT, request: Request) -> Response:
    return await _once(
        request,
        rt,
        ctx.tenant_id,
        lambda: rt.keys.rotate(
            key_id,
            tenant_id=ctx.tenant_id,
            actor=ctx.principal,
            overlap_s=body.overlap_s,
            expires_at=body.expires_at,
            within=ctx.scopes,
            by_key=ctx.principal,
        ),
    )


@router.delete("/v1/keys/{key_id}", tags=["tenant"])
def revoke_own_key(key_id: str, ctx: KeyWriter, rt: RT) -> o.KeyOut:
    """Revoke a key of the calling tenant that holds no scope the calling key lacks."""
    return o.KeyOut(**rt.keys.revoke(key_id, tenant_id=ctx.tenant_id, actor=ctx.principal, within=ctx.scopes))
