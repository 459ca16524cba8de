"""Secret routes, write-only: ``PUT /v1/secrets/{name}`` sets or rotates a secret,
``GET /v1/secrets`` lists names and dates, ``DELETE /v1/secrets/{name}`` removes one (scope
``secrets:write``), and the operator's ``/admin/tenants/{id}/secrets`` the same for any
tenant. No route answers a value, and no error body, log line or audit record holds one."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from patinox.api._deps import RT, Operator, SecretWriter
from patinox.control.secrets import SecretService
from patinox.storage import MAX_SECRET_BYTES, SecretInfo

router = APIRouter(tags=["secrets"])


class SecretPut(BaseModel):
    """A secret's new value. Never answered back."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    value: str = Field(
        min_length=1,
        max_length=MAX_SECRET_BYTES,
        description=f"the secret, 1-{MAX_SECRET_BYTES} bytes of UTF-8 text",
        json_schema_extra={"writeOnly": True},
    )


class SecretOut(BaseModel):
    """What may be said of a secret: its name, version and dates, never its value."""

    model_config = ConfigDict(frozen=True)
    name: str
    version: int = Field(description="1 when first set, one more on each rotation")
    created_at: datetime
    updated_at: datetime


def _out(info: SecretInfo) -> SecretOut:
    return SecretOut(
        name=info.name, version=info.version, created_at=info.created_at, updated_at=info.updated_at
    )


# --- a tenant's own ---------------------------------------------------------------------


@router.put("/v1/secrets/{name}", status_code=201, responses={200: {"model": SecretOut}})
def put_secret(name: str, body: SecretPut, ctx: SecretWriter, rt: RT, response: Response) -> SecretOut:
    """Set the secret ``name`` (``201``) or rotate it to a new value (``200``, its version
    one more); audited ``secret.set`` / ``secret.rotate``. A tenant's own provider key is
    the secret ``provider:<family>`` (``provider:openai``): its runs on that provider use it."""
    info, rotated = SecretService(rt.backend).put(ctx, name, body.value, actor=ctx.principal)
    response.status_code = 200 if rotated else 201
    return _out(info)


@router.get("/v1/secrets")
def list_secrets(ctx: SecretWriter, rt: RT) -> list[SecretOut]:
    """The calling tenant's secrets by name: names, versions and dates; never a value."""
    return [_out(i) for i in SecretService(rt.backend).list(ctx)]


@router.delete("/v1/secrets/{name}", status_code=204)
def delete_secret(name: str, ctx: SecretWriter, rt: RT) -> Response:
    """Delete the secret ``name`` (audited ``secret.delete``); ``404`` when there is none."""
    SecretService(rt.backend).delete(ctx, name, actor=ctx.principal)
    return Response(status_code=204)


# --- the operator's ---------------------------------------------------------------------


@router.put(
    "/admin/tenants/{tenant_id}/secrets/{name}",
    status_code=201,
    tags=["admin"],
    responses={200: {"model": SecretOut}},
)
def operator_put_secret(
    tenant_id: str, name: str, body: SecretPut, op: Operator, rt: RT, response: Response
) -> SecretOut:
    """Set or rotate a tenant's secret, as ``PUT /v1/secrets/{name}``."""
    rt.tenants.get(tenant_id)
    info, rotated = SecretService(rt.backend).put(tenant_id, name, body.value, actor=op.key_id)
    response.status_code = 200 if rotated else 201
    return _out(info)


@router.get("/admin/tenants/{tenant_id}/secrets", tags=["admin"])
def operator_list_secrets(tenant_id: str, _: Operator, rt: RT) -> list[SecretOut]:
    """A tenant's secrets by name, never a value."""
    rt.tenants.get(tenant_id)
    return [_out(i) for i in SecretService(rt.backend).list(tenant_id)]


@router.delete("/admin/tenants/{tenant_id}/secrets/{name}", status_code=204, tags=["admin"])
def operator_delete_secret(tenant_id: str, name: str, op: Operator, rt: RT) -> Response:
    """Delete a tenant's secret."""
    rt.tenants.get(tenant_id)
    SecretService(rt.backend).delete(tenant_id, name, actor=op.key_id)
    return Response(status_code=204)
