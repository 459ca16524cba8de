"""Helpers shared by the adversarial tests: tenants made through the Python API, row counts,
waits on runs in flight, and a server without embedded workers."""

from __future__ import annotations

import dataclasses
import time

from fastapi.testclient import TestClient
from sqlalchemy import text

from patinox.api import create_app
from patinox.control import TenantSpec
from patinox.runtime import Runtime
from patinox.tenancy import StorageModel, TenantContext
from tests.conftest import Deployment

TENANT_TABLES = ("agents", "runs", "memory", "usage_records", "audit_log", "api_keys")
"""The tables whose rows of a tenant must all be gone once it is deleted."""


def rows_of(runtime: Runtime, tenant_id: str) -> dict[str, int]:
    """Count the tenant's rows in each of :data:`TENANT_TABLES` (shared pool tables).

    Returns:
        ``{table name: row count}``.
    """
    with runtime.backend.engine.connect() as conn:
        return {
            t: int(
                conn.execute(
                    text(f"SELECT count(*) FROM {t} WHERE tenant_id = :t"), {"t": tenant_id}
                ).scalar_one()
            )
            for t in TENANT_TABLES
        }


def wait_no_runs_in_flight(runtime: Runtime, tenant_id: str, deadline_s: float = 5.0) -> None:
    """Wait until the tenant holds no queue slot (at most ``deadline_s`` seconds), then
    50 ms more for the settling transaction; returns silently at the deadline."""
    end = time.monotonic() + deadline_s
    while runtime.queue.held(tenant_id) and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(0.05)  # let the settling transaction finish


def wait_in_flight(client: TestClient, h: dict[str, str], n: int) -> None:
    """Wait (about 2 s at most) until ``/v1/usage`` shows at least ``n`` runs in flight.

    Raises:
        AssertionError: the runs never started.
    """
    for _ in range(200):
        if client.get("/v1/usage", headers=h).json()["runs_in_flight"] >= n:
            return
        time.sleep(0.01)
    raise AssertionError("run never started")


def no_workers(runtime: Runtime) -> TestClient:
    """A test client of a server that runs no embedded queue worker: queued runs wait
    until the test claims them itself."""
    runtime.settings = dataclasses.replace(runtime.settings, embedded_workers=0)
    return TestClient(create_app(runtime=runtime), raise_server_exceptions=False)


def new_tenant_context(runtime: Runtime, deployment: Deployment) -> TenantContext:
    """Create tenant ``alpha`` on the deployment's storage model, with a full-scope key.

    Returns:
        The tenant context that key authenticates to.
    """
    t = runtime.tenants.create(
        TenantSpec(name="alpha", storage_model=StorageModel(deployment.storage_model)), actor="test"
    )
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    return ctx
