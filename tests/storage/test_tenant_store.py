"""The data layer scopes every statement itself; the schema keeps tenant ids in every key."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import inspect

from patinox.agents import AgentDefinition, RunLimits, run_agent
from patinox.errors import AlreadyExists, InvalidRequest, NotFound, TenantContextMissing
from patinox.storage import SqlBackend
from patinox.storage._schema import TENANT_TABLES
from patinox.tenancy import TenantContext, new_id, tenant_scope
from tests._contexts import tenant_context

#: Tenant ids as Patinox makes them (a purge drops storage named after the id).
A, B = new_id("tn"), new_id("tn")


def ctx(tid: str) -> TenantContext:
    return tenant_context(tid)


AGENT = {
    "name": "a",
    "instructions": "i",
    "model": "simulated",
    "tools": [],
    "max_output_tokens": None,
    "max_tool_calls": None,
}


def test_store_needs_a_tenant(backend: SqlBackend) -> None:
    with pytest.raises(TenantContextMissing):
        backend.tenant_store()


def test_store_from_scope_is_bound_to_that_tenant(backend: SqlBackend) -> None:
    with tenant_scope(ctx("tn_a")):
        sa = backend.tenant_store()
        agent = sa.create_agent(AGENT)
    sb = backend.tenant_store(ctx("tn_b"))
    with pytest.raises(NotFound):
        sb.get_agent(agent["id"])
    with pytest.raises(NotFound):
        sb.update_agent(agent["id"], {"instructions": "x"})
    with pytest.raises(NotFound):
        sb.delete_agent(agent["id"])
    assert sb.list_agents() == []
    assert sa.get_agent(agent["id"])["instructions"] == "i"


def test_memory_is_per_tenant(backend: SqlBackend) -> None:
    sa, sb = backend.tenant_store(ctx("tn_a")), backend.tenant_store(ctx("tn_b"))
    sa.memory_put("k", "A")
    assert sb.memory_get("k") is None
    assert sb.memory_list() == []
    sb.memory_put("k", "B")
    sa.memory_put("k", "A2")
    assert (sa.memory_get("k"), sb.memory_get("k")) == ("A2", "B")
    sa.memory_put("k%", "wild")
    assert sa.memory_list("k%") == ["k%"]  # LIKE wildcards are escaped


def test_memory_key_with_nul_is_refused_on_every_backend(backend: SqlBackend) -> None:
    """The HTTP route refuses a NUL in a key, and PostgreSQL cannot store one in text: the
    store refuses it too (the memory tools write through it), and writes nothing."""
    sa = backend.tenant_store(ctx("tn_a"))
    with pytest.raises(InvalidRequest, match="NUL"):
        sa.memory_put("k\x00", "v")
    assert sa.memory_list() == []


def test_unique_agent_name_within_tenant_only(backend: SqlBackend) -> None:
    sa, sb = backend.tenant_store(ctx("tn_a")), backend.tenant_store(ctx("tn_b"))
    sa.create_agent(AGENT)
    sb.create_agent(AGENT)
    with pytest.raises(AlreadyExists):
        sa.create_agent(AGENT)


def test_run_cannot_reference_another_tenants_agent(backend: SqlBackend) -> None:
    """The composite foreign key (tenant_id, agent_id) is a second wall."""
    agent = backend.tenant_store(ctx("tn_a")).create_agent(AGENT)
    with pytest.raises(AlreadyExists):
        backend.tenant_store(ctx("tn_b")).create_run(
            {
                "agent_id": agent["id"],
                "principal": "k",
                "mode": "sync",
                "status": "running",
                "input": "x",
                "model": "simulated",
                "simulated": 1,
            }
        )


def test_every_tenant_table_leads_its_keys_with_tenant_id(backend: SqlBackend) -> None:
    insp = inspect(backend.engine)
    owned = backend.tenant_owned_tables()
    assert set(owned) == {t.name for t in TENANT_TABLES}
    for name in owned:
        pk = insp.get_pk_constraint(name)["constrained_columns"]
        if name in ("api_keys", "audit_log"):
            # Control-plane rows that may belong to no tenant (operator keys and records);
            # indexed by tenant id instead.
            assert any(ix["column_names"][0] == "tenant_id" for ix in insp.get_indexes(name)), name
        else:
            assert pk[0] == "tenant_id", name


def test_purge_reads_the_catalog(backend: SqlBackend) -> None:
    """A table added outside the known schema is purged too."""
    with backend.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE plugin_data (tenant_id TEXT, v TEXT)")
        conn.exec_driver_sql(f"INSERT INTO plugin_data VALUES ('{A}', 'x'), ('{B}', 'y')")
    counts = backend.purge_tenant(A)
    assert counts["plugin_data"] == 1
    with backend.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT tenant_id FROM plugin_data").fetchall()
    assert rows == [(B,)]


def test_migrations_are_idempotent(backend: SqlBackend) -> None:
    backend.migrate()
    backend.migrate()
    assert "alembic_version" in inspect(backend.engine).get_table_names()


@pytest.mark.parametrize("key", ["k\\u0000", "k" * 201])
def test_the_memory_tool_reports_a_key_the_store_refuses_and_the_run_goes_on(
    backend: SqlBackend, key: str
) -> None:
    """The store is the one place memory keys are checked: the ``memory_put`` tool hands its
    refusal to the model as a failed call (the run still succeeds) and nothing is written."""
    store = backend.tenant_store(ctx("tn_a"))
    definition = AgentDefinition(name="m", instructions="", model="simulated:instant", tools=("memory_put",))
    prompt = '/call memory_put {"key": "' + key + '", "value": "v"}'
    limits = RunLimits(max_output_tokens=64, max_tool_calls=2, timeout_s=30)
    outcome = asyncio.run(run_agent(definition, prompt, output_tokens=12, limits=limits, memory=store))
    assert "memory_put failed: memory keys" in outcome.output
    assert store.memory_list() == []
