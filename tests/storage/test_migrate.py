"""Migrations on PostgreSQL when several processes start at once."""

from __future__ import annotations

import multiprocessing as mp

from patinox.storage.engine import make_engine, migrate
from patinox.storage.postgres import PostgresDeployment


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
