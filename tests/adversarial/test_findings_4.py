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


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
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
    real = runtime.queue.release
    failures: list[str] = []

    def failing(tenant_id: str, run_id: str, *, conn: Any = None) -> None:
        if tenant_id == a.id and conn is not None and not failures:
            failures.append(run_id)
            raise StorageError("database error: OperationalError")
        real(tenant_id, run_id, conn=conn)

    monkeypatch.setattr(runtime.queue, "release", failing)
    r = a.run(agent, "hello there", output_tokens=2)
    assert failures, "the settlement never joined the control-plane transaction"
    assert r.status_code == 503, r.text
    usage = client.get("/v1/usage", headers=a.h).json()
    assert usage["runs_in_flight"] == 0
    assert usage["tokens_reserved"] == 0, usage
    assert b.run(b.agent("y"), "hi", output_tokens=1).status_code == 200
    assert client.get("/v1/usage", headers=b.h).json()["tokens_reserved"] == 0
