"""Operator routes under ``/admin``: tenants, plans, capacity, usage and audit (tenants' keys:
:mod:`patinox.api.routers.keys`)."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from patinox.api import schemas as o
from patinox.api._deps import RT, Operator
from patinox.control import Tenant, TenantSpec, TenantUpdate
from patinox.limits import fair_loop
from patinox.tenancy import PLANS, Plan

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/plans")
def plans(_: Operator) -> list[Plan]:
    return list(PLANS.values())


class CapacityOut(BaseModel):
    """This server process's fair share of its own capacity (each process has its own)."""

    pid: int = Field(description="the answering process")
    event_loop: str = Field(description="'tenant-fair' (ready callbacks by tenant in turn) or 'fifo'")
    fair_share: dict[str, Any] = Field(
        description="the admission's state: enabled, limit (runs), running, waiting, lag_ms (the "
        "lag the limit follows), smoothed_lag_ms, target_lag_ms, probe_lag_ms (a timer's), busy "
        "(0-1), tenants, refused, completion_rate_per_s; only enabled=false when "
        "PATINOX_FAIR_SHARE=off"
    )


@router.get("/capacity")
async def capacity(_: Operator, rt: RT) -> CapacityOut:
    admission = rt.runs.admission
    return CapacityOut(
        pid=os.getpid(),
        event_loop=fair_loop.describe(asyncio.get_running_loop()),
        fair_share=admission.snapshot() if admission is not None else {"enabled": False},
    )


@router.post("/tenants", status_code=201)
def create_tenant(spec: TenantSpec, op: Operator, rt: RT) -> Tenant:
    return rt.tenants.create(spec, actor=op.key_id)


@router.get("/tenants")
def list_tenants(_: Operator, rt: RT, include_deleted: bool = False) -> list[Tenant]:
    return rt.tenants.list(include_deleted=include_deleted)


@router.get("/tenants/{tenant_id}")
def get_tenant(tenant_id: str, _: Operator, rt: RT) -> Tenant:
    return rt.tenants.get(tenant_id)


@router.patch("/tenants/{tenant_id}")
def update_tenant(tenant_id: str, change: TenantUpdate, op: Operator, rt: RT) -> Tenant:
    return rt.tenants.update(tenant_id, change, actor=op.key_id)


@router.post("/tenants/{tenant_id}/suspend")
def suspend_tenant(tenant_id: str, op: Operator, rt: RT) -> Tenant:
    return rt.tenants.suspend(tenant_id, actor=op.key_id)


@router.post("/tenants/{tenant_id}/resume")
def resume_tenant(tenant_id: str, op: Operator, rt: RT) -> Tenant:
    return rt.tenants.resume(tenant_id, actor=op.key_id)


@router.delete("/tenants/{tenant_id}")
def delete_tenant(tenant_id: str, op: Operator, rt: RT) -> dict[str, Any]:
    counts = rt.tenants.delete(tenant_id, actor=op.key_id)
    return {"id": tenant_id, "state": "deleted", "rows_purged": counts}


@router.get("/usage")
def usage(
    _: Operator, rt: RT, tenant_id: str | None = None, since: o.Timestamp | None = None
) -> list[o.UsageSummaryOut]:
    return [o.UsageSummaryOut.model_validate(u) for u in rt.backend.usage_summary(tenant_id, since=since)]


@router.get("/audit")
def audit(
    _: Operator,
    rt: RT,
    tenant_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after_seq: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> list[o.AuditOut]:
    return [o.AuditOut(**a) for a in rt.backend.list_audit(tenant_id, limit=limit, after_seq=after_seq)]
