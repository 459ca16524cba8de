"""PostgreSQL's second wall: pooled connections carry no tenant between transactions,
and the application role is held by forced row-level security everywhere."""

from __future__ import annotations

from sqlalchemy import Connection, create_engine, text

from patinox.conformance import _raw
from patinox.conformance._checks._common import raises, seed
from patinox.conformance._deployment import SuiteEnv, Target, TenantHandle, check
from patinox.errors import NotFound
from patinox.storage import SqlBackend
from patinox.storage.crypto import key_provider_from_url
from patinox.storage.engine import normalise_url, with_database
from patinox.tenancy import StorageModel


def pool_of_one_connection(t: Target, _: SuiteEnv) -> None:
    """One pooled connection, two tenants alternating: each sees only its own rows, and
    between transactions the connection carries no tenant setting (also after a failed
    transaction), so a forgotten setting can never serve the next tenant."""
    from patinox.storage import Placements

    assert t.pg is not None and t.owner_url is not None
    small = create_engine(normalise_url(t.app_url), pool_size=1, max_overflow=0)
    owner = create_engine(normalise_url(t.owner_url), pool_size=1, max_overflow=0)
    placements = Placements(
        app_url=t.app_url, owner_url=t.owner_url, app_role=t.pg.app_role, main=small, owner=owner
    )
    backend = SqlBackend(small, placements=placements, key_provider=key_provider_from_url(t.kek_url))
    try:
        _alternate(t, backend)
    finally:
        backend.close()
    # The server's own pool, after every request so far, holds no tenant either.
    with t.backend.engine.connect() as conn:
        left = conn.execute(text("SELECT current_setting('patinox.tenant_id', true)")).scalar()
        check(left in (None, ""), f"a pooled connection of the server carries tenant setting {left!r}")


def _alternate(t: Target, backend: SqlBackend) -> None:
    a, b = t.new_tenant("one-a"), t.new_tenant("one-b")
    model = StorageModel(t.storage_model)
    stores = {x.id: backend.tenant_store(t.context(x)) for x in (a, b)}
    keys: dict[str, list[str]] = {a.id: [], b.id: []}
    tables = [_raw.location(t, x.id).table("memory") for x in (a, b)]
    pids: set[int] = set()
    for i in range(8):
        for x, other in ((a, b), (b, a)):
            key = f"k{i}-{t.markers.atom()}"
            stores[x.id].memory_put(key, t.markers.atom())
            keys[x.id].append(key)
            got = stores[other.id].memory_list(limit=1000)
            check(sorted(got) == sorted(keys[other.id]), f"{model.value} store of one tenant listed {got}")
            check(
                raises(stores[x.id].memory_delete, NotFound, args=("no-such-key",)) is not None,
                "deleting a missing key did not fail",
            )
            with backend.engine.connect() as conn:
                pids.add(int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()))
                for name in ("patinox.tenant_id", "patinox.scope"):
                    left = conn.execute(text(f"SELECT current_setting('{name}', true)")).scalar()
                    check(
                        left in (None, ""), f"after a transaction the pooled connection keeps {name}={left!r}"
                    )
                for table in tables:
                    n = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                    check(n == 0, f"with no setting the pooled connection sees {n} rows of {table}")
                conn.rollback()
    check(len(pids) == 1, f"the pool of one used {len(pids)} connections")


def rls_as_app_role(t: Target, _: SuiteEnv) -> None:
    """Connected as the application role: it is no superuser, has no BYPASSRLS and owns
    nothing; every table with a ``tenant_id`` column, in every schema and database, has
    forced row-level security with a policy; with no tenant setting it sees no row, with
    another tenant's setting it can neither read nor write the tenant's rows; every view
    is ``security_invoker``; no materialized view or SECURITY DEFINER function exists."""
    assert t.pg is not None
    _raw.require_rls_bypass(t)
    a, b = t.new_tenant("rls-a"), t.new_tenant("rls-b")
    seed(t, a)
    seed(t, b)
    with t.backend.engine.connect() as conn:
        user, sup, bypass = conn.execute(
            text("SELECT current_user, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        ).one()
        check(
            user == t.pg.app_role, f"the server connects as {user}, not the application role {t.pg.app_role}"
        )
        check(not sup and not bypass, f"the application role has SUPERUSER={sup} BYPASSRLS={bypass}")
    for db in _raw.pg_databases(t):
        with _raw.admin(t, db) as conn:
            _catalog_checks(conn, db, t.pg.app_role)
        _app_role_checks(t, db, a, b)


def _catalog_checks(conn: Connection, db: str, app_role: str) -> None:
    sys = ["pg_catalog", "information_schema", "pg_toast"]
    owned = conn.execute(
        text(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = :r AND c.relnamespace::regnamespace::text <> ALL(:sys)"
        ),
        {"r": app_role, "sys": sys},
    ).scalar_one()
    check(owned == 0, f"{db}: the application role owns {owned} relations")
    rows = conn.execute(
        text(
            "SELECT n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity, "
            "(SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname <> ALL(:sys) AND EXISTS ("
            "SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' "
            "AND NOT a.attisdropped)"
        ),
        {"sys": sys},
    ).all()
    check(rows, f"{db}: no table with a tenant_id column found")
    weak = [f"{s}.{n}" for s, n, rls, forced, policies in rows if not (rls and forced and policies)]
    check(not weak, f"{db}: tables without forced row-level security and a policy: {weak}")
    views = conn.execute(
        text(
            "SELECT n.nspname || '.' || c.relname, c.relkind, coalesce(c.reloptions, '{}') "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('v', 'm') AND n.nspname <> ALL(:sys)"
        ),
        {"sys": sys},
    ).all()
    bad = [
        name
        for name, kind, opts in views
        if kind == "m" or not set(opts) & {"security_invoker=true", "security_invoker=on"}
    ]
    check(not bad, f"{db}: views that run with their owner's rights (or materialized views): {bad}")
    definers = (
        conn.execute(
            text(
                "SELECT n.nspname || '.' || p.proname FROM pg_proc p "
                "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.prosecdef AND n.nspname <> ALL(:sys)"
            ),
            {"sys": sys},
        )
        .scalars()
        .all()
    )
    check(not definers, f"{db}: SECURITY DEFINER functions (they bypass the caller's RLS): {definers}")


def _app_role_checks(t: Target, db: str, a: TenantHandle, b: TenantHandle) -> None:
    assert t.pg is not None
    with _raw.admin(t, db) as conn:
        tables = [
            (str(s), str(n))
            for s, n in conn.execute(
                text(
                    "SELECT table_schema, table_name FROM information_schema.columns "
                    "WHERE column_name = 'tenant_id' "
                    "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
                )
            )
        ]
        total = {
            (s, n): int(conn.execute(text(f'SELECT count(*) FROM "{s}"."{n}"')).scalar_one())
            for s, n in tables
        }
    engine = create_engine(normalise_url(with_database(t.pg.app_url, db)))
    try:
        with engine.begin() as conn:
            for (s, n), rows in total.items():
                seen = conn.execute(text(f'SELECT count(*) FROM "{s}"."{n}"')).scalar_one()
                check(
                    seen == 0,
                    f"{db}: with no setting the application role sees {seen} of {rows} rows of {s}.{n}",
                )
        loc = _raw.location(t, a.id)
        if loc.pg_database != db:
            return
        memory = loc.table("memory")
        with engine.connect() as conn:
            conn.execute(text("SELECT set_config('patinox.tenant_id', :t, true)"), {"t": b.id})
            seen = conn.execute(
                text(f"SELECT count(*) FROM {memory} WHERE tenant_id = :a"), {"a": a.id}
            ).scalar_one()
            check(
                seen == 0, f"{db}: with tenant B's setting the application role sees {seen} memory rows of A"
            )
            changed = conn.execute(
                text(f"UPDATE {memory} SET value = 'x' WHERE tenant_id = :a"), {"a": a.id}
            ).rowcount
            check(
                changed == 0,
                f"{db}: with tenant B's setting the application role changed {changed} rows of A",
            )
            insert = text(
                f"INSERT INTO {memory} (tenant_id, key, value, updated_at) VALUES (:a, 'x', 'y', now())"
            )
            err = raises(conn.execute, Exception, args=(insert, {"a": a.id}))
            check(
                err is not None and "row-level security" in str(err),
                f"{db}: with tenant B's setting the application role could insert a row for A ({err})",
            )
            conn.rollback()
    finally:
        engine.dispose()
