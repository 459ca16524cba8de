"""One tenant can neither reach, nor write, nor count another tenant's data.

Attacks: a foreign agent id in a run or a run filter, another tenant's per-agent rate limit
spent from outside, a tenant store asked to re-assign its rows to a neighbour, interleaved
runs whose memory writes could cross over, audit sequence numbers that would count a
neighbour's actions. A foreign object answers like a missing one (404, not 403) and the
neighbour's rows, quotas and counters stay untouched. Every test performs the attack and
asserts the correct behaviour.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from fastapi.testclient import TestClient

from patinox.runtime import Runtime


def test_run_filter_by_foreign_agent_answers_like_a_missing_agent(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: ``GET /v1/runs?agent_id=<B's agent>`` hoping the filter is applied without the
    tenant predicate."""
    a = make_tenant("alpha")
    b = make_tenant("beta")
    ag = a.agent("x")
    a.run(ag, "secret prompt")
    assert client.get(f"/v1/runs?agent_id={ag}", headers=b.h).json() == []
    assert client.get("/v1/runs?agent_id=ag_missing", headers=b.h).json() == []


def test_async_run_on_a_foreign_agent_is_not_found_and_costs_nothing(
    client: TestClient, make_tenant: Any, runtime: Runtime
) -> None:
    """Attack: tenant B queues an async run naming A's agent id (to run A's agent, or burn
    A's quota). It answers 404 and neither tenant's queue gains an entry."""
    a, b = make_tenant("alpha"), make_tenant("beta", limits={"runs_per_day": 1})
    agent = a.agent("x")
    r = b.run(agent, "hi", mode="async")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert runtime.queue.depth(a.id) == runtime.queue.depth(b.id) == 0
    own = b.agent("y")
    assert b.run(own, "hi", mode="async", output_tokens=1).status_code == 202  # quota unspent


def test_per_agent_rate_limit_of_one_tenant_cannot_be_spent_by_another(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: B hammers POST /v1/agents/<A's agent>/runs to exhaust A's per-agent limit.
    The window key includes the tenant, so A's own runs are still admitted."""
    a = make_tenant("alpha", limits={"agent_runs_per_minute": 2})
    b = make_tenant("beta")
    agent = a.agent("x")
    for _ in range(5):
        assert b.run(agent, "hi").status_code in (404, 429)
    assert a.run(agent, "hi", output_tokens=1).status_code == 200


def test_a_tenant_store_cannot_move_its_rows_into_another_tenant(runtime: Runtime, make_tenant: Any) -> None:
    """Attack: ``TenantStore`` (public API) builds its UPDATEs from the values dict it is
    given: the prebuilt run update sets every column named by a parameter, so code holding
    alpha's store that passes ``{"tenant_id": <beta>, "agent_id": <beta's agent>}`` to
    ``update_run`` (or ``tenant_id`` to ``update_agent``) re-assigns alpha's row to beta
    on SQLite, where no row-level security checks the new row. Beta's run list then holds
    a row sealed under alpha's key and every ``GET /v1/runs`` of beta fails
    (``DecryptionFailed``, a 500): one tenant's store wrote into another tenant.

    Correct: a store never writes a row's tenant id or its key columns; the change is
    refused, alpha keeps its rows and beta sees nothing new.
    """
    import contextlib

    from patinox.errors import PatinoxError

    a, b = make_tenant("alpha"), make_tenant("beta")
    a_agent, b_agent = a.agent("x"), b.agent("x")
    run_id = a.run(a_agent, "alpha's secret", output_tokens=1).json()["id"]

    sa, sb = runtime.backend.acting_on(a.id), runtime.backend.acting_on(b.id)
    with contextlib.suppress(PatinoxError):
        sa.update_run(run_id, {"status": "failed", "tenant_id": b.id, "agent_id": b_agent})
    with contextlib.suppress(PatinoxError):
        sa.settle_run(
            run_id,
            {"tenant_id": b.id, "agent_id": b_agent},
            usage=None,
            audit={"actor": "cli", "action": "run.finish", "target": run_id, "outcome": "ok"},
        )
    with contextlib.suppress(PatinoxError):
        sa.update_agent(a_agent, {"tenant_id": b.id, "name": "moved"})
    assert sb.list_runs() == []
    assert [x["id"] for x in sb.list_agents()] == [b_agent]
    assert [r["id"] for r in sa.list_runs()] == [run_id]
    assert [x["id"] for x in sa.list_agents()] == [a_agent]


def test_interleaved_async_runs_of_two_tenants_write_only_their_own_memory(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: two tenants' async runs interleave on the same event loop (and the memory tools
    hop to worker threads); a context leak between tasks/threads would put one tenant's
    write into the other's memory."""
    a = make_tenant("alpha")
    b = make_tenant("beta")
    model = "simulated:ttft_ms=30,tpot_ms=0"
    ag_a = a.agent("w", model=model, tools=["memory_put"])
    ag_b = b.agent("w", model=model, tools=["memory_put"])
    ids = []
    for i in range(4):
        ids.append(
            (a, a.run(ag_a, f'/call memory_put {{"key": "a{i}", "value": "A"}}', mode="async").json()["id"])
        )
        ids.append(
            (b, b.run(ag_b, f'/call memory_put {{"key": "b{i}", "value": "B"}}', mode="async").json()["id"])
        )
    for t, rid in ids:
        for _ in range(300):
            if client.get(f"/v1/runs/{rid}", headers=t.h).json()["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.01)
    assert client.get("/v1/memory", headers=a.h).json() == [f"a{i}" for i in range(4)]
    assert client.get("/v1/memory", headers=b.h).json() == [f"b{i}" for i in range(4)]


def test_audit_sequence_numbers_do_not_count_a_neighbours_actions(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: on the pool storage model every tenant's audit records share one table
    whose ``seq`` is a deployment-wide counter, and ``GET /v1/audit`` shows it. Alpha
    writes one audit record, waits, writes another: the gap between the two ``seq``
    values is exactly the number of audited actions of every other tenant in between
    (each run of a neighbour is one ``run.finish`` record). With one neighbour, alpha
    counts beta's runs, agent edits and memory writes minute by minute.

    Correct: the numbers alpha sees depend on alpha's records only (consecutive), and
    ``after_seq`` still pages through alpha's log.
    """
    a, b = make_tenant("alpha"), make_tenant("beta")
    client.put("/v1/memory/one", json={"value": "1"}, headers=a.h)
    b_agent = b.agent("busy")
    for _ in range(5):
        assert b.run(b_agent, "hi", output_tokens=1).status_code == 200
    client.put("/v1/memory/two", json={"value": "2"}, headers=a.h)
    seqs = [x["seq"] for x in client.get("/v1/audit", headers=a.h).json()]
    assert len(seqs) >= 3
    assert [y - x for x, y in itertools.pairwise(seqs)] == [1] * (len(seqs) - 1), seqs
    page = client.get("/v1/audit", params={"after_seq": seqs[-2]}, headers=a.h).json()
    assert [(x["seq"], x["target"]) for x in page] == [(seqs[-1], "two")]
