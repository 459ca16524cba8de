"""A rolling upgrade keeps every tenant working: old payloads, old overrides, racing migrations.

Attacks: a process of the previous release keeps writing payloads in the old format,
limit overrides stored before today's bounds existed, several processes migrating one
SQLite database at once. Old payloads still open (and re-seal on rotation), an override
past its bound applies at the bound, every process starts, and neighbours see none of
it. Every test performs the attack and asserts the correct behaviour.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.runtime import Runtime


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_payloads_written_by_a_process_not_yet_upgraded_stay_readable(
    client: TestClient, make_tenant: Any, runtime: Runtime
) -> None:
    """Attack (an upgrade, as the README describes it: every server and worker migrates
    when it starts, so during a rolling restart processes of the previous release still
    run against the migrated database): a process not yet restarted keeps writing sealed
    payloads in the old format, ``"ptxenc1:" + base64(blob)`` as text (SQLite keeps the
    text in the BLOB column, PostgreSQL stores its bytes). The new build refused such a
    value as "not sealed": the memory entry and the run answered ``decryption_failed``
    for ever, every run listing holding it failed, and the tenant could no longer be
    exported, moved or have its key rotated (each opens every payload).

    Correct: a payload in the previous format still opens (it is the same authenticated
    blob, only encoded), a key rotation re-seals it in the new format, and the neighbour
    sees none of it.
    """
    import base64

    from sqlalchemy import text

    a, b = make_tenant("alpha"), make_tenant("beta")
    agent = a.agent()
    assert client.put("/v1/memory/k", json={"value": "remember"}, headers=a.h).status_code == 200
    run = a.run(agent, "the question", output_tokens=2).json()
    assert client.put("/v1/memory/k", json={"value": "theirs"}, headers=b.h).status_code == 200
    store = runtime.backend.acting_on(a.id)
    key = runtime.backend.keyring.current_key(a.id)
    from patinox.storage._crypto.aead import encrypt_str

    def legacy(table: str, record_id: str, plain: str) -> str:
        blob = encrypt_str(plain, key=key, table=table, record_id=record_id)
        return "ptxenc1:" + base64.b64encode(blob).decode("ascii")

    # What a process of the previous release writes (its columns were Text).
    with store._tx() as conn:
        conn.execute(
            text("UPDATE memory SET value = :v WHERE tenant_id = :t AND key = 'k'"),
            {"v": legacy("memory.value", "k", "written by the old release"), "t": a.id},
        )
        conn.execute(
            text("UPDATE runs SET input = :v WHERE tenant_id = :t AND id = :r"),
            {"v": legacy("runs.input", run["id"], "old input"), "t": a.id, "r": run["id"]},
        )
    r = client.get("/v1/memory/k", headers=a.h)
    assert r.status_code == 200, r.text
    assert r.json()["value"] == "written by the old release"
    runs = client.get("/v1/runs", headers=a.h)
    assert runs.status_code == 200, runs.text
    assert [x["input"] for x in runs.json()] == ["old input"]
    runtime.backend.keyring.rotate_dek(a.id)
    assert store.reencrypt() == 3
    assert client.get("/v1/memory/k", headers=a.h).json()["value"] == "written by the old release"
    assert client.get(f"/v1/runs/{run['id']}", headers=a.h).json()["input"] == "old input"
    assert client.get("/v1/memory/k", headers=b.h).json()["value"] == "theirs"
    assert [x["input"] for x in client.get("/v1/runs", headers=b.h).json()] == []


def test_overrides_stored_before_their_bounds_existed_do_not_break_the_deployment(
    client: TestClient, make_tenant: Any, runtime: Runtime, operator_key: str
) -> None:
    """Attack (an upgrade): the previous release accepted any limit override, e.g. a run
    timeout of 40 days or ``max_concurrent_runs`` 2,000,000; this one bounds them when
    they are set. The stored overrides of existing tenants were validated against the new
    bounds on every read: every request of such a tenant failed with an unhandled
    validation error (500, not even the JSON error format), and so did the operator's
    ``GET /admin/tenants``, for every tenant of the deployment, hiding which tenant to fix.

    Correct: a stored override past today's bound applies at the bound (the tenant keeps
    working as close to its setting as this build allows); the operator's listing works;
    the neighbour is unaffected.
    """
    from sqlalchemy import update

    from patinox.storage import _schema as s
    from tests.conftest import auth

    a, b = make_tenant("alpha"), make_tenant("beta")
    stored = {"run_timeout_s": 40 * 86_400.0, "max_concurrent_runs": 2_000_000, "max_tool_calls_per_run": 3}
    with runtime.backend.transaction() as conn:
        conn.execute(update(s.tenants).where(s.tenants.c.id == a.id).values(limit_overrides=stored))
    listed = client.get("/admin/tenants", headers=auth(operator_key))
    assert listed.status_code == 200, listed.text
    assert {t["id"] for t in listed.json()} == {a.id, b.id}
    me = client.get("/v1/me", headers=a.h)
    assert me.status_code == 200, me.text
    limits = me.json()["limits"]
    assert (limits["run_timeout_s"], limits["max_concurrent_runs"]) == (30 * 86_400, 1_000_000)
    assert limits["max_tool_calls_per_run"] == 3
    assert a.run(a.agent(), "hi", output_tokens=1).status_code == 200
    assert client.get("/v1/me", headers=b.h).json()["limits"]["max_concurrent_runs"] == 4


def _migrate_at(url: str, start: Any) -> None:
    from patinox.storage.engine import make_engine, migrate

    engine = make_engine(url, pool_size=1)
    try:
        start.wait(timeout=120)
        migrate(engine)
    finally:
        engine.dispose()


def test_processes_starting_together_on_sqlite_all_migrate(
    client: TestClient, make_tenant: Any, runtime: Runtime, deployment: Any
) -> None:
    """Attack (an upgrade of the embedded deployment, whose server and local worker
    processes all migrate when they start): several processes start at once on a database
    at revision 0004. PostgreSQL migrations are serialised by an advisory lock; SQLite's
    were not, and the driver runs ``CREATE TABLE`` outside the migration's transaction,
    so migration 0005's table rebuilds collided (``table _alembic_tmp_runs already
    exists``) and processes failed to start.

    Correct: every process starts (one migrates, the others wait and find nothing to do)
    and every tenant's payloads read back unchanged.
    """
    import multiprocessing as mp

    from tests.storage.test_migrate import _alembic_downgrade

    a, b = make_tenant("alpha", "pro"), make_tenant("beta")
    run = a.run(a.agent(), "the question", output_tokens=2).json()
    assert client.put("/v1/memory/theirs", json={"value": "beta's"}, headers=b.h).status_code == 200
    store = runtime.backend.acting_on(a.id)
    for i in range(1500):
        store.memory_put(f"k{i}", "v" * 1000)
    _alembic_downgrade(runtime.backend.placements.owner, "0004")
    spawn = mp.get_context("spawn")
    start = spawn.Barrier(4)
    procs = [spawn.Process(target=_migrate_at, args=(deployment.db_url, start)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert client.get("/v1/memory/k7", headers=a.h).json()["value"] == "v" * 1000
    assert client.get(f"/v1/runs/{run['id']}", headers=a.h).json()["input"] == "the question"
    assert client.get("/v1/memory/theirs", headers=b.h).json()["value"] == "beta's"
    assert client.get("/v1/memory/theirs", headers=a.h).status_code == 404
