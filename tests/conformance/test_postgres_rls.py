"""Row-level security, checked while connected as the application role.

Scenarios from public bug reports of other systems: a tenant setting that survives its
transaction on a pooled connection; RLS that the connecting role bypasses (owner,
superuser, BYPASSRLS); views that run with their owner's rights.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from patinox.storage import SqlBackend, WebhookOutbox
from patinox.storage._placement import Placements
from patinox.storage.crypto import key_provider_from_url
from patinox.storage.engine import normalise_url, with_database
from patinox.storage.postgres import PostgresDeployment
from patinox.tenancy import StorageModel, TenantContext
from tests._contexts import tenant_context
from tests.conftest import Deployment

TENANT_TABLES = (
    "agents",
    "runs",
    "run_attempts",
    "memory",
    "usage_records",
    "audit_log",
    "api_keys",
    "webhook_endpoints",
    "webhook_deliveries",
    "webhook_attempts",
)


def ctx(tid: str, model: StorageModel = StorageModel.POOL) -> TenantContext:
    return tenant_context(tid, storage_model=model)


@pytest.fixture
def pg(deployment: Deployment, pg_deployment: PostgresDeployment, backend: SqlBackend) -> PostgresDeployment:
    """The scratch database, migrated (through ``backend``) and emptied for this test."""
    return pg_deployment


@pytest.fixture
def one_connection_backend(pg: PostgresDeployment, kek_url: str) -> Iterator[SqlBackend]:
    """A backend whose pool holds exactly one connection, so every transaction reuses it."""
    small = create_engine(normalise_url(pg.app_url), pool_size=1, max_overflow=0)
    owner = create_engine(normalise_url(pg.owner_url), pool_size=1, max_overflow=0)
    placements = Placements(
        app_url=pg.app_url, owner_url=pg.owner_url, app_role=pg.app_role, main=small, owner=owner
    )
    b = SqlBackend(small, placements=placements, key_provider=key_provider_from_url(kek_url))
    yield b
    b.close()


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_app_role_cannot_bypass_rls(pg: PostgresDeployment) -> None:
    eng = create_engine(normalise_url(pg.app_url))
    with eng.connect() as conn:
        role = conn.execute(
            text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        ).one()
        assert tuple(role) == (False, False)
        owned = conn.execute(
            text("SELECT count(*) FROM pg_tables WHERE tableowner = current_user")
        ).scalar_one()
        assert owned == 0
        forced = dict(
            conn.execute(
                text(
                    "SELECT relname, relforcerowsecurity AND relrowsecurity FROM pg_class "
                    "WHERE relname = ANY(:t) AND relkind = 'r' AND relnamespace = 'public'::regnamespace"
                ),
                {"t": list(TENANT_TABLES)},
            ).all()
        )
        assert forced == dict.fromkeys(TENANT_TABLES, True)
    eng.dispose()


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_no_setting_sees_nothing_and_cannot_write_for_another(
    backend: SqlBackend, pg: PostgresDeployment
) -> None:
    backend.tenant_store(ctx("tn_a")).memory_put("k", "secret-a")
    eng = create_engine(normalise_url(pg.app_url))
    with eng.begin() as conn:
        # Fail closed: a forgotten predicate AND a forgotten setting still show nothing.
        assert conn.execute(text("SELECT count(*) FROM memory")).scalar_one() == 0
    with eng.begin() as conn:
        conn.execute(text("SELECT set_config('patinox.tenant_id', 'tn_b', true)"))
        assert conn.execute(text("SELECT count(*) FROM memory")).scalar_one() == 0
        with pytest.raises(Exception, match="row-level security"):
            conn.execute(
                text(
                    "INSERT INTO memory (tenant_id, key, value, updated_at) VALUES ('tn_a', 'x', 'y', now())"
                )
            )
    with eng.begin() as conn:
        conn.execute(text("SELECT set_config('patinox.tenant_id', 'tn_a', true)"))
        assert conn.execute(text("SELECT count(*) FROM memory")).scalar_one() == 1
    eng.dispose()


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_webhook_rows_are_visible_to_their_tenant_only(backend: SqlBackend, pg: PostgresDeployment) -> None:
    """Endpoints (tenant data) and the outbox and its log (control plane) alike: as the
    application role, no setting or another tenant's sees none of them and cannot write
    one for the tenant; its own setting sees them."""
    store = backend.tenant_store(ctx("tn_a"))
    endpoint = store.webhooks().create(
        url="https://hooks.example.com/", event_types=["run.succeeded"], description="", secret="whsec_AAAA"
    )
    outbox = WebhookOutbox(backend.control_tx, backend.engine)
    outbox.enqueue("tn_a", [endpoint["id"]], "webhook.ping", run_id=None)
    (claimed,) = outbox.claim("loop", lease_s=60)
    assert outbox.record(
        claimed, at=claimed.created_at, status_code=200, error=None, duration_ms=1.0, state="succeeded"
    )
    tables = ("webhook_endpoints", "webhook_deliveries", "webhook_attempts")
    eng = create_engine(normalise_url(pg.app_url))
    try:
        for setting, expected in ((None, 0), ("tn_b", 0), ("tn_a", 1)):
            with eng.begin() as conn:
                if setting is not None:
                    conn.execute(text("SELECT set_config('patinox.tenant_id', :t, true)"), {"t": setting})
                for table in tables:
                    got = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                    assert got == expected, (setting, table)
        with eng.begin() as conn:
            conn.execute(text("SELECT set_config('patinox.tenant_id', 'tn_b', true)"))
            with pytest.raises(Exception, match="row-level security"):
                conn.execute(
                    text(
                        "INSERT INTO webhook_deliveries (tenant_id, id, endpoint_id, event_type, state, "
                        "attempts, next_attempt_at, created_at) "
                        "VALUES ('tn_a', 'whd_x', 'whe_x', 'run.failed', 'pending', 0, now(), now())"
                    )
                )
        # The tenant-bound log read of another tenant finds nothing of tn_a's endpoint.
        assert outbox.log("tn_b", endpoint["id"]) == []
        assert len(outbox.log("tn_a", endpoint["id"])) == 1
    finally:
        eng.dispose()


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_pool_of_one_two_tenants_alternating(one_connection_backend: SqlBackend) -> None:
    b = one_connection_backend
    sa, sb = b.tenant_store(ctx("tn_a")), b.tenant_store(ctx("tn_b"))
    for i in range(10):
        sa.memory_put(f"a{i}", "A")
        assert sb.memory_list() == [f"b{j}" for j in range(i)]
        sb.memory_put(f"b{i}", "B")
        assert sa.memory_list() == sorted(f"a{j}" for j in range(i + 1))
        # Between transactions the one pooled connection carries no tenant.
        with b.engine.connect() as conn:
            left = conn.execute(text("SELECT current_setting('patinox.tenant_id', true)")).scalar()
            assert left in (None, "")
            assert conn.execute(text("SELECT count(*) FROM memory")).scalar_one() == 0


@pytest.mark.parametrize("deployment", ["pg-bridge", "pg-silo"], indirect=True)
def test_rls_forced_in_bridge_schemas_and_silo_databases(
    client: object, make_tenant: object, deployment: Deployment, pg: PostgresDeployment
) -> None:
    t = make_tenant("alpha")  # type: ignore[operator]
    if deployment.storage_model == "bridge":
        url, schema = pg.app_url, t.id
    else:
        url, schema = with_database(pg.app_url, f"{pg.database}_{t.id}"), "public"
    eng = create_engine(normalise_url(url))
    with eng.connect() as conn:
        forced = dict(
            conn.execute(
                text(
                    "SELECT c.relname, c.relforcerowsecurity AND c.relrowsecurity FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relkind = 'r' "
                    "AND c.relname = ANY(:t)"
                ),
                {"s": schema, "t": list(TENANT_TABLES)},
            ).all()
        )
        assert forced == dict.fromkeys(TENANT_TABLES, True)
        # The tenant's own rows exist but the app role without a setting sees none.
        assert conn.execute(text(f'SELECT count(*) FROM "{schema}".audit_log')).scalar_one() == 0
    eng.dispose()


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_every_view_is_security_invoker(pg: PostgresDeployment) -> None:
    eng = create_engine(normalise_url(pg.app_url))
    with eng.connect() as conn:
        views = conn.execute(
            text(
                "SELECT c.relname, coalesce(c.reloptions, '{}') FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            )
        ).all()
    eng.dispose()
    for name, options in views:
        assert "security_invoker=true" in options or "security_invoker=on" in options, name
