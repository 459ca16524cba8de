"""TLS certificate routes: ``PUT /v1/tls`` sets or replaces the calling tenant's
certificate and key, ``GET /v1/tls`` describes it (subject, names, expiry; never the key),
``DELETE /v1/tls`` removes it (scope ``secrets:write``); the operator's
``/admin/tenants/{id}/tls`` the same for any tenant. See :mod:`patinox.control.tls`."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from patinox.api._deps import RT, Operator, SecretWriter
from patinox.control.tls import TenantTls, TlsCertificateInfo
from patinox.storage import MAX_SECRET_BYTES

router = APIRouter(tags=["tls"])


class TlsPut(BaseModel):
    """A certificate chain and its private key, PEM. The key is never answered back."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    certificate: str = Field(
        min_length=1,
        max_length=MAX_SECRET_BYTES // 2,
        description="PEM certificates: the tenant's certificate first, then its intermediates",
    )
    private_key: str = Field(
        min_length=1,
        max_length=MAX_SECRET_BYTES // 4,
        description="the certificate's private key, unencrypted PEM",
        json_schema_extra={"writeOnly": True},
    )


class TlsOut(BaseModel):
    """A tenant's certificate as it may be shown: never its key."""

    model_config = ConfigDict(frozen=True)
    subject: str = Field(description="the certificate's subject (RFC 4514)")
    issuer: str = Field(description="its issuer (RFC 4514)")
    sans: list[str] = Field(description="its subjectAltName DNS names")
    not_before: datetime
    not_after: datetime
    days_left: int = Field(description="whole days until not_after")
    hosts: list[str] = Field(description="the tenant's host names now")
    hosts_not_covered: list[str] = Field(description="host names the certificate does not cover")
    warning: str | None = Field(description="set when under 30 days are left or a host is not covered")
    version: int = Field(description="1 on first upload, one more per replacement")


def _out(info: TlsCertificateInfo) -> TlsOut:
    return TlsOut(**{f: getattr(info, f) for f in TlsCertificateInfo.__slots__})


def _tls(rt: RT) -> TenantTls:
    return TenantTls(rt.backend, rt.endpoints)


@router.put("/v1/tls")
def put_tls(body: TlsPut, ctx: SecretWriter, rt: RT) -> TlsOut:
    """Set or replace the calling tenant's certificate and key, validated first (422
    ``invalid_tls``, ``tls_key_mismatch``, ``tls_name_not_covered``, ``tls_expired``;
    nothing stored then). Served on the tenant's host names from the next handshake."""
    return _out(_tls(rt).put(ctx, body.certificate, body.private_key, actor=ctx.principal))


@router.get("/v1/tls")
def get_tls(ctx: SecretWriter, rt: RT) -> TlsOut:
    """The calling tenant's certificate: subject, names, expiry, warning; ``404`` if none."""
    return _out(_tls(rt).get(ctx, actor=ctx.principal))


@router.delete("/v1/tls", status_code=204)
def delete_tls(ctx: SecretWriter, rt: RT) -> Response:
    """Remove the calling tenant's certificate (its names get the deployment's again)."""
    _tls(rt).delete(ctx, actor=ctx.principal)
    return Response(status_code=204)


@router.put("/admin/tenants/{tenant_id}/tls", tags=["admin"])
def operator_put_tls(tenant_id: str, body: TlsPut, op: Operator, rt: RT) -> TlsOut:
    """Set or replace a tenant's certificate, as ``PUT /v1/tls``."""
    rt.tenants.get(tenant_id)
    return _out(_tls(rt).put(tenant_id, body.certificate, body.private_key, actor=op.key_id))


@router.get("/admin/tenants/{tenant_id}/tls", tags=["admin"])
def operator_get_tls(tenant_id: str, op: Operator, rt: RT) -> TlsOut:
    """A tenant's certificate, as ``GET /v1/tls``."""
    rt.tenants.get(tenant_id)
    return _out(_tls(rt).get(tenant_id, actor=op.key_id))


@router.delete("/admin/tenants/{tenant_id}/tls", status_code=204, tags=["admin"])
def operator_delete_tls(tenant_id: str, op: Operator, rt: RT) -> Response:
    """Remove a tenant's certificate."""
    rt.tenants.get(tenant_id)
    _tls(rt).delete(tenant_id, actor=op.key_id)
    return Response(status_code=204)
