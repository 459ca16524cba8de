"""Adversarial findings, round 4 (one-transaction run path, binary payloads, run paging).

Each test performs an attack and asserts the CORRECT behaviour; each failed against the
build it was written for. Docstrings describe the attack and what a fixed build must do.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.api import Runtime
from patinox.errors import StorageError
from patinox.storage import TenantStore


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def _fail_joined_release_once(runtime: Runtime, tenant_id: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the tenant's first slot release inside a joined settlement transaction fail,
    as a lock timeout or a deadlock would; returns the run ids it failed for."""
    real = runtime.queue.release
    failures: list[str] = []

    def failing(tid: str, run_id: str, *, conn: Any = None) -> None:
        if tid == tenant_id and conn is not None and not failures:
            failures.append(run_id)
            raise StorageError("database error: OperationalError")
        real(tid, run_id, conn=conn)

    monkeypatch.setattr(runtime.queue, "release", failing)
    return failures


def test_a_failed_settlement_transaction_gives_the_tokens_back(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: make the settlement transaction of a pool tenant's synchronous run fail
    after the token settlement statement ran (here: the slot release in the same
    transaction hits a storage error, as a lock timeout or a deadlock would). The
    transaction rolls back, the settlement included; the fallback then settles and
    releases on its own, but the reservation had already been marked settled, so the
    fallback skipped it: the run's worst case stayed reserved until the end of the UTC
    day. A tenant (or a flaky database) thus shrinks the tenant's daily budget run by run
    until every run is refused ``quota_exceeded``.

    Correct: after the failed run nothing of it stays reserved, its slot is free, and the
    neighbour is unaffected.
    """
    a = make_tenant("alpha")
    b = make_tenant("beta")
    agent = a.agent("x")
    failures = _fail_joined_release_once(runtime, a.id, monkeypatch)
    a.run(agent, "hello there", output_tokens=2)
    assert failures, "the settlement never joined the control-plane transaction"
    usage = client.get("/v1/usage", headers=a.h).json()
    assert usage["runs_in_flight"] == 0
    assert usage["tokens_reserved"] == 0, usage
    assert b.run(b.agent("y"), "hi", output_tokens=1).status_code == 200
    assert client.get("/v1/usage", headers=b.h).json()["tokens_reserved"] == 0


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-bridge"], indirect=True)
def test_a_sync_run_whose_row_cannot_be_written_does_not_count_against_runs_per_day(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: make the run-row write of a synchronous run fail after admission (a storage
    error in the tenant's own database; or the agent deleted in between, a foreign-key
    violation). Pool tenants write slot, quotas and row in one transaction, so all of it
    rolls back; silo tenants write the row after the control-plane transaction and
    compensate, but the compensation returned the tokens and the slot only: the run
    that never existed still counted against ``runs_per_day``. README: runs_per_day is
    "given back when its admission fails after that".

    Correct: a refused run leaves no run row, no reservation, no slot and no count against
    ``runs_per_day`` behind, on both paths; a neighbour is not affected.
    """
    a = make_tenant("alpha", limits={"runs_per_day": 1})
    b = make_tenant("beta")
    agent = a.agent("x")
    real = TenantStore.apply

    def failing(self: TenantStore, write: Any, *, conn: Any = None) -> None:
        if self.tenant_id == a.id and len(write.statements) == 1:  # the run row's insert
            raise StorageError("database error: OperationalError")
        real(self, write, conn=conn)

    monkeypatch.setattr(TenantStore, "apply", failing)
    r = a.run(agent, "hi", output_tokens=1)
    assert r.status_code == 503, r.text
    assert client.get("/v1/runs", headers=a.h).json() == []
    usage = client.get("/v1/usage", headers=a.h).json()
    assert (usage["tokens_reserved"], usage["runs_in_flight"]) == (0, 0)
    assert b.run(b.agent("y"), "hi", output_tokens=1).status_code == 200
    monkeypatch.setattr(TenantStore, "apply", real)
    # The refused run did not use the tenant's one run of the day.
    again = a.run(agent, "hi", output_tokens=1)
    assert again.status_code == 200, again.text


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-bridge"], indirect=True)
def test_a_run_listing_reads_no_more_than_its_byte_budget(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a tenant stores many runs with large inputs (the API takes 1,000,000
    characters a run) and lists them with ``limit=500``. The page's byte budget (8 MiB)
    was applied after the query: every row of the page, payloads included, was fetched
    into the shared server process first and only then cut, so one listing of 500 runs
    of 1 MB still held over 500 MB, the pressure on every neighbour's memory the budget
    was added to remove.

    Correct: a page cut by its budget reads about that budget, not the whole page (here
    8 MB stored, a 256 KiB budget: the listing allocates well under half of what is
    stored); the neighbour sees none of it.
    """
    import tracemalloc

    from patinox.api.routers import tenant as tenant_routes

    a, b = make_tenant("alpha", "pro"), make_tenant("beta")
    agent = a.agent()
    b.run(b.agent(), "mine", output_tokens=1)
    store = runtime.backend.acting_on(a.id)
    big = "x" * 200_000
    for _ in range(40):
        store.create_run(
            {
                "agent_id": agent,
                "principal": a.key_id,
                "mode": "sync",
                "status": "succeeded",
                "input": big,
                "model": "simulated:instant",
                "simulated": 1,
                "input_tokens": 0,
                "output_tokens": 0,
                "tool_calls": 0,
            }
        )
    monkeypatch.setattr(tenant_routes, "RUNS_PAGE_BYTES", 256 * 1024)
    tracemalloc.start()
    try:
        r = client.get("/v1/runs?limit=500", headers=a.h)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert [x["input"] for x in r.json()] == [big]
    assert 'rel="next"' in r.headers["Link"]
    assert peak < 4_000_000, peak
    assert [x["input"] for x in client.get("/v1/runs?limit=500", headers=b.h).json()] == ["mine"]


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


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_a_failed_settlement_transaction_does_not_lose_the_runs_result(
    client: TestClient, make_tenant: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: as above, the pool tenant's one settlement transaction fails in its
    control-plane part (the slot release). The run's result, usage record and audit
    record were in the same transaction and rolled back with it, while the fallback
    charged the tokens the model used: the run stayed ``running`` for ever (no reaper
    looks at it once its slot is gone), the tokens were billed with no usage record
    behind them, and the audit log did not show the run. Before the single transaction
    (and still for bridge and silo tenants) a failed release never touched the run's
    own records.

    Correct: the run's own records are still written when only the control-plane part of
    its settlement failed: the run is finished, its usage record accounts for every token
    charged, and the neighbour sees none of it.
    """
    a = make_tenant("alpha")
    b = make_tenant("beta")
    agent = a.agent("x")
    failures = _fail_joined_release_once(runtime, a.id, monkeypatch)
    r = a.run(agent, "hello there", output_tokens=2)
    assert failures, "the settlement never joined the control-plane transaction"
    assert r.status_code == 200, r.text
    [run] = client.get("/v1/runs", headers=a.h).json()
    assert run["status"] == "succeeded", run
    usage = client.get("/v1/usage", headers=a.h).json()
    billed = sum(r["input_tokens"] + r["output_tokens"] for r in usage["records"])
    assert usage["tokens_today"] == billed > 0, usage
    assert (usage["tokens_reserved"], usage["runs_in_flight"]) == (0, 0)
    assert "run.finish" in [x["action"] for x in client.get("/v1/audit", headers=a.h).json()]
    assert client.get("/v1/runs", headers=b.h).json() == []
    assert client.get("/v1/usage", headers=b.h).json()["records"] == []


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
