"""The deployments under test: a scratch PostgreSQL database, SQLite files, the HTTP app.

A :class:`Target` is one storage deployment (``sqlite-pool``, ``sqlite-silo``, ``pg-pool``,
``pg-bridge``, ``pg-silo``) served by the real HTTP app in-process
(:class:`fastapi.testclient.TestClient` over :func:`patinox.api.create_app`), with an
operator key and helpers to create tenants through ``POST /admin/tenants``. On PostgreSQL
the app connects as the application role (owner role for DDL only), exactly as a
production server does.
"""

from __future__ import annotations

import json
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.errors import ConfigurationError
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend, open_backend
from patinox.storage.crypto import FileKeyProvider, key_provider_from_url
from patinox.storage.postgres import PostgresDeployment, bootstrap, drop
from patinox.tenancy import TenantContext

#: Every deployment the suite knows, in the order it runs them.
ALL_DEPLOYMENTS: tuple[str, ...] = ("sqlite-pool", "sqlite-silo", "pg-pool", "pg-bridge", "pg-silo")

#: Request rate given to every tenant the suite makes (requests/minute): the suite checks
#: isolation, not limits, and a stateful run sends far more than a plan allows.
_SUITE_RPM = 10_000_000


class Answer(Protocol):
    """What the suite reads of an HTTP response (httpx's or httpx2's, whichever the
    installed Starlette test client returns)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


class SuiteEnv(Protocol):
    """What a check gets besides its deployment: settings and resources of the whole run."""

    examples: int

    def process_pool(self) -> Executor:
        """A pool of one spawned worker process, shared by every deployment."""
        ...

    def report(self, line: object) -> None:
        """Keep a line of hypothesis' report for the failure details."""
        ...


class ConformanceFailure(AssertionError):
    """A conformance check found a violation (an AssertionError that ``python -O`` keeps)."""


def check(condition: object, message: str) -> None:
    """Raise :class:`ConformanceFailure` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConformanceFailure(message)


def select_deployments(models: list[str] | None, *, postgres: bool) -> list[str]:
    """The deployment names to run, in suite order.

    ``models`` may name deployments (``pg-bridge``) or storage models (``silo`` = every
    database offering it). ``None`` means every deployment available: SQLite always,
    PostgreSQL when an admin URL is given.

    Raises:
        ConfigurationError: an unknown name, or a PostgreSQL model without an admin URL.
    """
    if models is None:
        return [d for d in ALL_DEPLOYMENTS if postgres or d.startswith("sqlite-")]
    chosen: set[str] = set()
    for raw in models:
        name = raw.strip().lower()
        if name in ALL_DEPLOYMENTS:
            if name.startswith("pg-") and not postgres:
                raise ConfigurationError(f"{name} needs a PostgreSQL admin URL", field="models")
            chosen.add(name)
        elif name in ("pool", "bridge", "silo"):
            found = [
                d for d in ALL_DEPLOYMENTS if d.endswith("-" + name) and (postgres or d.startswith("sqlite-"))
            ]
            if not found:
                raise ConfigurationError(
                    f"storage model {name!r} needs a PostgreSQL admin URL", field="models"
                )
            chosen.update(found)
        else:
            raise ConfigurationError(
                f"unknown storage model {raw!r}; use one of {', '.join(ALL_DEPLOYMENTS)} or pool/bridge/silo",
                field="models",
            )
    return [d for d in ALL_DEPLOYMENTS if d in chosen]


class Markers:
    """Unique marker strings ("atoms") and tenant names for one conformance run.

    Every secret the suite stores (agent instructions, memory keys and values, run inputs)
    is or contains an atom ``zx<tag><7 digits>q``; :data:`atom_re` finds them in any
    response or in raw storage, so a leak is a string match, not a guess.
    """

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self._n = 0
        self.atom_re = re.compile(rf"zx{self.tag}\d{{7}}q")

    def atom(self) -> str:
        """A new marker string, never returned before in this run."""
        self._n += 1
        return f"zx{self.tag}{self._n:07d}q"

    def tenant_name(self, label: str) -> str:
        """A tenant name unique to this run: ``cf-<tag>-<label>-<n>`` (DNS-label shape)."""
        self._n += 1
        return f"cf-{self.tag}-{label}-{self._n}"[:63]


#: Ids made by :func:`patinox.tenancy.new_id` (``tn_...``, ``ag_...``, ``run_...``).
ID_RE = re.compile(r"\b[a-z]{2,4}_[0-9a-hjkmnp-tv-z]{26}\b")


#: Requests of tenant X on another tenant's object, compared with the same request on a
#: missing one. ``{id}`` is an agent id, a run id, a memory key or a thread id, per the
#: first field.
PROBES: tuple[tuple[str, str, str, dict[str, Any] | None], ...] = (
    ("agent", "GET", "/v1/agents/{id}", None),
    ("agent", "PATCH", "/v1/agents/{id}", {"instructions": "probe"}),
    ("agent", "DELETE", "/v1/agents/{id}", None),
    ("agent", "POST", "/v1/agents/{id}/runs", {"input": "probe", "output_tokens": 4}),
    ("agent", "GET", "/v1/runs?agent_id={id}", None),
    ("run", "GET", "/v1/runs/{id}", None),
    ("run", "POST", "/v1/runs/{id}/cancel", None),
    ("memory", "GET", "/v1/memory/{id}", None),
    ("memory", "DELETE", "/v1/memory/{id}", None),
    ("thread", "GET", "/v1/threads/{id}", None),
    ("thread", "GET", "/v1/threads/{id}/messages", None),
    (
        "thread",
        "POST",
        "/v1/threads/{id}/runs",
        {"agent_id": "ag_probe", "input": "probe", "output_tokens": 4},
    ),
    ("thread", "DELETE", "/v1/threads/{id}", None),
)


#: The scopes of the suite's tenant keys: the default ones and ``webhooks:write``.
TENANT_KEY_SCOPES = ["agents:write", "runs:write", "read", "webhooks:write"]


def auth(key: str) -> dict[str, str]:
    """The Authorization header of an API key."""
    return {"Authorization": f"Bearer {key}"}


@dataclass
class TenantHandle:
    """A tenant created through ``POST /admin/tenants``, with a full-scope key."""

    id: str
    name: str
    key: str
    key_id: str

    @property
    def h(self) -> dict[str, str]:
        return auth(self.key)


@dataclass
class Target:
    """One deployment under test, served in-process by the real HTTP app.

    Attributes:
        name: ``<sqlite|pg>-<storage model>``.
        storage_model: what new tenants get (``pool``, ``bridge``, ``silo``).
        app_url / owner_url: the URLs the server uses (PostgreSQL: application / owner role).
        kek_url: the KEK file (``file://...``).
        admin_url: PostgreSQL administrator URL (raw reads that bypass row-level security).
        pg: the bootstrapped scratch database, or ``None`` on SQLite.
        runtime / client: the server objects and the in-process HTTP client.
        op: headers of the operator key.
        markers: the run's marker strings and tenant names.
        work_dir: a private directory of this deployment (KEK, SQLite files).
    """

    name: str
    storage_model: str
    app_url: str
    owner_url: str | None
    kek_url: str
    admin_url: str | None
    pg: PostgresDeployment | None
    runtime: Runtime
    client: TestClient
    op: dict[str, str]
    markers: Markers
    work_dir: Path

    @property
    def postgres(self) -> bool:
        return self.pg is not None

    @property
    def backend(self) -> SqlBackend:
        return self.runtime.backend

    @property
    def sqlite_path(self) -> Path:
        """The main SQLite file (SQLite deployments only)."""
        return Path(self.app_url.removeprefix("sqlite:///"))

    def tenant_spec(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "plan": "enterprise",
            "storage_model": self.storage_model,
            "limits": {"requests_per_minute": _SUITE_RPM},
        }

    def new_tenant(self, label: str, *, name: str | None = None) -> TenantHandle:
        """Create a tenant (and a full-scope key) through the admin API.

        Raises:
            ConformanceFailure: the API refused.
        """
        name = name or self.markers.tenant_name(label)
        r = self.client.post("/admin/tenants", json=self.tenant_spec(name), headers=self.op)
        check(r.status_code == 201, f"creating tenant {name}: {r.status_code} {r.text[:300]}")
        tid = str(r.json()["id"])
        k = self.client.post(
            f"/admin/tenants/{tid}/keys",
            json={"name": "conformance", "scopes": TENANT_KEY_SCOPES},
            headers=self.op,
        )
        check(k.status_code == 201, f"creating a key of {name}: {k.status_code} {k.text[:300]}")
        return TenantHandle(id=tid, name=name, key=str(k.json()["key"]), key_id=str(k.json()["id"]))

    def delete_tenant(self, tenant_id: str) -> None:
        """Delete a tenant through the admin API (expects 200)."""
        r = self.client.delete(f"/admin/tenants/{tenant_id}", headers=self.op)
        check(r.status_code == 200, f"deleting tenant {tenant_id}: {r.status_code} {r.text[:300]}")

    def context(self, tenant: TenantHandle) -> TenantContext:
        """The tenant context the server derives from the tenant's key (what a request gets)."""
        ctx = self.runtime.keys.authenticate(tenant.key)
        check(isinstance(ctx, TenantContext), f"the key of {tenant.name} did not resolve to a tenant")
        assert isinstance(ctx, TenantContext)
        return ctx

    def open_separate_backend(self) -> SqlBackend:
        """Another backend on the same deployment, as another server process would open it."""
        return open_backend(
            self.app_url,
            owner_url=self.owner_url,
            key_provider=key_provider_from_url(self.kek_url),
            migrate_schema=False,
        )

    def worker_spec(self) -> dict[str, str | None]:
        """What a worker process needs to open its own backend (data, not objects)."""
        return {"app_url": self.app_url, "owner_url": self.owner_url, "kek_url": self.kek_url}

    # -- HTTP helpers ----------------------------------------------------------------------

    def put_memory(self, tenant: TenantHandle, key: str, value: str) -> None:
        r = self.client.put(f"/v1/memory/{key}", json={"value": value}, headers=tenant.h)
        check(r.status_code == 200, f"PUT /v1/memory/{key} for {tenant.name}: {r.status_code} {r.text[:300]}")

    def get_memory(self, tenant: TenantHandle, key: str) -> Answer:
        return self.client.get(f"/v1/memory/{key}", headers=tenant.h)

    def new_agent(self, tenant: TenantHandle, name: str, instructions: str = "") -> str:
        body = {
            "name": name,
            "model": "simulated:instant",
            "instructions": instructions,
            "tools": ["memory_get", "memory_list"],
        }
        r = self.client.post("/v1/agents", json=body, headers=tenant.h)
        check(r.status_code == 201, f"POST /v1/agents for {tenant.name}: {r.status_code} {r.text[:300]}")
        return str(r.json()["id"])

    def run(
        self,
        tenant: TenantHandle,
        agent_id: str,
        text: str,
        output_tokens: int = 48,
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """A sync run, with an ``Idempotency-Key`` when given; returns the finished run
        (expects 200 ``succeeded``)."""
        headers = tenant.h if idempotency_key is None else {**tenant.h, "Idempotency-Key": idempotency_key}
        r = self.client.post(
            f"/v1/agents/{agent_id}/runs",
            json={"input": text, "output_tokens": output_tokens},
            headers=headers,
        )
        check(r.status_code == 200, f"run for {tenant.name}: {r.status_code} {r.text[:300]}")
        row: dict[str, Any] = r.json()
        check(
            row["status"] == "succeeded", f"run for {tenant.name} ended {row['status']}: {row.get('error')}"
        )
        return row


def memory_get_call(key: str) -> str:
    """A prompt line that makes the simulated model call the ``memory_get`` tool."""
    return "/call memory_get " + json.dumps({"key": key})


@contextmanager
def scratch_postgres(
    admin_url: str, *, on_cleanup_error: Callable[[str, BaseException], None]
) -> Iterator[PostgresDeployment]:
    """A scratch database with its own owner and application roles, dropped on exit.

    Names are unique per run (``patinox_conf_<hex>``, roles ``patinox_conf_<hex>_owner`` /
    ``_app``) so concurrent runs and earlier deployments never share a role; the roles get
    a random password (needed where ``pg_hba.conf`` asks for one) and are dropped with the
    database, so the run leaves no login role behind. A failure to drop is passed to
    ``on_cleanup_error(what, error)`` rather than raised, so the run's result survives it.

    Raises:
        StorageError: PostgreSQL refused the set-up (unreachable, or the admin role lacks
            rights); whatever was made is dropped again.
    """
    suffix = secrets.token_hex(4)
    database = f"patinox_conf_{suffix}"
    owner_role, app_role = f"patinox_conf_{suffix}_owner", f"patinox_conf_{suffix}_app"

    def cleanup(report: Callable[[str, BaseException], None]) -> None:
        try:
            drop(admin_url, database=database)
        except Exception as err:
            report(f"could not drop the scratch database {database} (and its silo databases)", err)
        try:
            _drop_roles(admin_url, (app_role, owner_role))
        except Exception as err:
            report(f"could not drop the scratch roles {owner_role}, {app_role}", err)

    try:
        dep = bootstrap(
            admin_url,
            database=database,
            owner_role=owner_role,
            app_role=app_role,
            password=secrets.token_urlsafe(18),
        )
    except BaseException:
        cleanup(lambda what, err: None)  # the set-up error is the one to report
        raise
    try:
        yield dep
    finally:
        cleanup(on_cleanup_error)


def _drop_roles(admin_url: str, roles: tuple[str, ...]) -> None:
    from sqlalchemy import create_engine

    from patinox.storage.engine import normalise_url, translate_errors

    engine = create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with translate_errors(), engine.connect() as conn:
            for role in roles:
                conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        engine.dispose()


@contextmanager
def open_target(
    name: str, *, pg: PostgresDeployment | None, admin_url: str | None, base_dir: Path, markers: Markers
) -> Iterator[Target]:
    """Build deployment ``name``: KEK file, backend (migrated), runtime, app, operator key."""
    kind, model = name.split("-", 1)
    work_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base_dir))
    kek_path = work_dir / "kek.json"
    FileKeyProvider.create(kek_path)
    kek_url = f"file://{kek_path}"
    if kind == "sqlite":
        app_url, owner_url = f"sqlite:///{work_dir / 'patinox.db'}", None
    else:
        if pg is None:
            raise ConfigurationError(f"{name} needs a PostgreSQL scratch database")
        app_url, owner_url = pg.app_url, pg.owner_url
    with ExitStack() as stack:
        backend = open_backend(app_url, owner_url=owner_url, key_provider=key_provider_from_url(kek_url))
        stack.callback(backend.close)
        runtime = Runtime.build(
            Settings(database_url=app_url, owner_url=owner_url, kek_url=kek_url), backend=backend
        )
        client = stack.enter_context(TestClient(create_app(runtime=runtime), raise_server_exceptions=False))
        op_key = runtime.keys.create(tenant_id=None, name="conformance", scopes=None, actor="conformance")
        yield Target(
            name=name,
            storage_model=model,
            app_url=app_url,
            owner_url=owner_url,
            kek_url=kek_url,
            admin_url=admin_url if kind == "pg" else None,
            pg=pg if kind == "pg" else None,
            runtime=runtime,
            client=client,
            op=auth(op_key.secret),
            markers=markers,
            work_dir=work_dir,
        )
