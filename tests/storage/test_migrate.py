"""Migrations on PostgreSQL when several processes start at once."""

from __future__ import annotations

import base64
import multiprocessing as mp
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from patinox.storage import SqlBackend
from patinox.storage import _schema as schema
from patinox.storage.engine import make_engine, migrate
from patinox.storage.postgres import PostgresDeployment
from tests.conftest import ALL_DEPLOYMENTS, Deployment


def _migrate_repeatedly(owner_url: str, app_role: str, start: mp.synchronize.Barrier, rounds: int) -> None:
    engine = make_engine(owner_url, pool_size=1)
    try:
        start.wait(timeout=60)
        for _ in range(rounds):
            migrate(engine, app_role=app_role)
    finally:
        engine.dispose()


def test_servers_starting_together_all_migrate(pg_deployment: PostgresDeployment) -> None:
    """Four processes migrating (and re-granting the app role) at the same instant all
    succeed. Without serialisation, PostgreSQL refuses concurrent GRANTs on the same
    objects with ``tuple concurrently updated`` and a server fails to start."""
    spawn = mp.get_context("spawn")
    start = spawn.Barrier(4)
    procs = [
        spawn.Process(
            target=_migrate_repeatedly, args=(pg_deployment.owner_url, pg_deployment.app_role, start, 10)
        )
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]


def _alembic_downgrade(engine: Engine, revision: str, schema: str | None = None) -> None:
    from alembic import command
    from alembic.config import Config

    from patinox.storage.engine import _MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as conn:
        if schema is not None:
            conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
        cfg.attributes["connection"] = conn
        cfg.attributes["schema"] = schema
        command.downgrade(cfg, revision)


def _placement_owner(backend: SqlBackend, tenant_id: str, model: str) -> tuple[Engine, str | None, bool]:
    """(owner engine, schema, dispose after) of the tenant's placement."""
    p = backend.placements
    if model == "bridge":
        return p.owner, tenant_id, False
    if model == "silo":
        if p.postgres:
            return make_engine(p._silo_url(tenant_id, owner=True), pool_size=1), None, True
        return p._silo_engine(tenant_id), None, False
    return p.owner, None, False


@pytest.mark.parametrize("deployment", ALL_DEPLOYMENTS, indirect=True)
def test_sealed_payloads_move_from_base64_text_to_bytes(
    client: TestClient, make_tenant: Any, backend: SqlBackend, deployment: Deployment
) -> None:
    """Migration 0005 round trip on a deployment with data: downgraded, the payloads are
    ``ptxenc1:`` base64 text again; ``SqlBackend.migrate`` (what every server runs at start)
    then upgrades the main database *and* the tenant's bridge schema or silo database, and
    every payload reads back unchanged, stored as the blob itself."""
    a = make_tenant("alpha")
    agent = a.agent()
    assert client.put("/v1/memory/k1", json={"value": "remember this"}, headers=a.h).status_code == 200
    run = a.run(agent, "the question", output_tokens=4).json()
    model = deployment.storage_model
    store = backend.acting_on(a.id)
    m, r = schema.memory, schema.runs

    def stored() -> tuple[Any, Any, Any]:
        with store._tx() as conn:
            value = conn.execute(select(m.c.value).where(m.c.tenant_id == a.id, m.c.key == "k1")).scalar_one()
            row = conn.execute(select(r.c.input, r.c.output).where(r.c.tenant_id == a.id)).one()
        return value, row[0], row[1]

    blobs = stored()
    assert all(isinstance(v, bytes) for v in blobs)
    engine, in_schema, dispose = _placement_owner(backend, a.id, model)
    try:
        _alembic_downgrade(engine, "0004", in_schema)
        if model != "pool":
            _alembic_downgrade(backend.placements.owner, "0004")
        with engine.connect() as conn:
            if in_schema is not None:
                conn.exec_driver_sql(f'SET search_path TO "{in_schema}"')
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT set_config('patinox.scope', 'control', false)")
            old = conn.exec_driver_sql("SELECT value FROM memory").scalar_one()
        assert isinstance(old, str) and old == "ptxenc1:" + base64.b64encode(blobs[0]).decode()
    finally:
        if dispose:
            engine.dispose()
    backend.migrate()
    assert stored() == blobs
    assert client.get("/v1/memory/k1", headers=a.h).json()["value"] == "remember this"
    again = client.get(f"/v1/runs/{run['id']}", headers=a.h).json()
    assert (again["input"], again["output"]) == ("the question", run["output"])


def test_the_sqlite_conversion_of_0005_pages_through_every_row(tmp_path: Any) -> None:
    """Rows are converted in key-ordered batches (here of 2): all 7 are, each once."""
    import importlib.util

    from sqlalchemy import create_engine, text

    from patinox.storage.engine import _MIGRATIONS

    spec = importlib.util.spec_from_file_location(
        "m0005", _MIGRATIONS / "versions" / "0005_sealed_payloads_as_bytes.py"
    )
    assert spec is not None and spec.loader is not None
    m0005 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m0005)
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    blobs = {f"k{i}": bytes([1, i]) * 20 for i in range(7)}
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE memory (tenant_id TEXT, key TEXT, value BLOB, PRIMARY KEY (tenant_id, key))"
        )
        for i, (key, blob) in enumerate(blobs.items()):
            conn.execute(
                text("INSERT INTO memory VALUES (:t, :k, :v)"),
                {"t": f"tn_{i % 2}", "k": key, "v": "ptxenc1:" + base64.b64encode(blob).decode()},
            )
        m0005._convert(conn, "memory", ("tenant_id", "key"), ("value",), m0005._blob, batch=2)
        got = dict(conn.execute(text("SELECT key, value FROM memory")).all())
    engine.dispose()
    assert got == blobs
