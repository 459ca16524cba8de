"""Migration 0008: usage records gain ``cpu_seconds`` and ``peak_memory_bytes``, in the
main database and in every bridge schema and silo database (``SqlBackend.migrate``, what
every server runs at start); records written before keep NULL there."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from patinox.storage import SqlBackend
from tests.conftest import Deployment
from tests.storage.test_migrate import _alembic_downgrade, _placement_owner


def _usage_columns(backend: SqlBackend, tenant_id: str, model: str) -> set[str]:
    engine, in_schema, dispose = _placement_owner(backend, tenant_id, model)
    try:
        return {c["name"] for c in inspect(engine).get_columns("usage_records", schema=in_schema)}
    finally:
        if dispose:
            engine.dispose()


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-bridge", "pg-silo"], indirect=True)
def test_usage_records_gain_cpu_and_memory_columns_everywhere(
    client: TestClient, make_tenant: Any, backend: SqlBackend, deployment: Deployment
) -> None:
    a = make_tenant("alpha")
    run = a.run(a.agent(), "the question", output_tokens=4).json()
    model = deployment.storage_model
    new = {"cpu_seconds", "peak_memory_bytes"}
    assert new <= _usage_columns(backend, a.id, model)
    engine, in_schema, dispose = _placement_owner(backend, a.id, model)
    try:
        _alembic_downgrade(engine, "0007", in_schema)
        if model != "pool":
            _alembic_downgrade(backend.placements.owner, "0007")
    finally:
        if dispose:
            engine.dispose()
    assert not new & _usage_columns(backend, a.id, model)
    backend.migrate()
    assert new <= _usage_columns(backend, a.id, model)
    [record] = backend.acting_on(a.id).list_usage()
    assert record["run_id"] == run["id"]
    assert record["cpu_seconds"] is None and record["peak_memory_bytes"] is None
