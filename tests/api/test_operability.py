"""What an operator needs when a dependency fails: ``/readyz`` names it, a tenant call that
fails on it answers a clean 503 and is logged (with the tenant id, never the key), and every
request is logged with the request id its response carries."""

from __future__ import annotations

import hashlib
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from patinox.api import create_app
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend, open_backend
from patinox.storage.crypto import key_provider_from_url
from tests.conftest import Deployment, TenantHandle, auth

REDIS_URL = "redis://127.0.0.1:6379/0"


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers (a hung Redis)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"redis://127.0.0.1:{s.getsockname()[1]}/0"


@pytest.fixture
def make_client(
    deployment: Deployment, backend: SqlBackend, kek_url: str
) -> Iterator[Callable[..., TestClient]]:
    """A started app (lifespan run: the embedded worker too) on this test's deployment."""
    opened: list[TestClient] = []

    def make(rate_limit_storage: str = "memory://", embedded_workers: int = 8) -> TestClient:
        settings = Settings(
            database_url=deployment.db_url,
            owner_url=deployment.owner_url,
            kek_url=kek_url,
            rate_limit_storage=rate_limit_storage,
            embedded_workers=embedded_workers,
        )
        c = TestClient(
            create_app(runtime=Runtime.build(settings, backend=backend)), raise_server_exceptions=False
        )
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def tenant_on(client: TestClient, deployment: Deployment) -> TenantHandle:
    op = client.app.state.runtime.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret  # type: ignore[attr-defined]
    return TenantHandle(client, op, "acme", storage_model=deployment.storage_model)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def assert_no_secret(logs: list[dict[str, Any]], key: str) -> None:
    text = repr(logs)
    assert key not in text
    assert key.rsplit("_", 1)[1] not in text
    assert hashlib.sha256(key.encode()).hexdigest() not in text


# --- readiness --------------------------------------------------------------------------


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_readyz_is_200_when_every_dependency_works(make_client: Callable[..., TestClient]) -> None:
    r = make_client(rate_limit_storage=REDIS_URL).get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "ready",
        "checks": {
            "database": {"status": "ok"},
            "limit_store": {"status": "ok"},
            "workers": {"status": "ok"},
        },
    }


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_readyz_reports_workers_disabled_when_the_server_runs_none(
    make_client: Callable[..., TestClient],
) -> None:
    r = make_client(embedded_workers=0).get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["workers"] == {"status": "disabled"}
    assert r.json()["checks"]["limit_store"] == {"status": "ok"}  # memory://


@pytest.mark.only_deployments("sqlite-pool")
def test_readyz_is_503_naming_a_dead_limit_store_while_healthz_stays_ok(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(rate_limit_storage=f"redis://127.0.0.1:{closed_port()}/0")
    with capture_logs() as logs:
        r = client.get("/readyz")
        again = client.get("/readyz")
    assert r.status_code == 503, r.text
    assert r.json()["status"] == "not_ready"
    assert r.json()["checks"] == {
        "database": {"status": "ok"},
        "limit_store": {"status": "failing", "error": "ConnectionError"},
        "workers": {"status": "ok"},
    }
    assert again.status_code == 503
    # Liveness checks no dependency.
    assert client.get("/healthz").status_code == 200
    # The failure is logged when it starts, not at every probe.
    failed = events(logs, "dependency_check_failed")
    assert [(e["dependency"], e["error"]) for e in failed] == [("limit_store", "ConnectionError")]
    assert "Connection refused" in failed[0]["cause"]


@pytest.mark.only_deployments("sqlite-pool")
def test_readyz_answers_when_redis_accepts_and_never_replies(
    make_client: Callable[..., TestClient], silent_redis: str
) -> None:
    # The ping waits on Redis's socket timeout in a thread; the probe answers before that.
    client = make_client(rate_limit_storage=silent_redis)
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["limit_store"]["status"] == "failing"
    assert r.json()["checks"]["database"] == {"status": "ok"}


def test_readyz_is_503_naming_a_dead_database(kek_url: str) -> None:
    url = f"postgresql://patinox_app@127.0.0.1:{closed_port()}/patinox"
    backend = open_backend(url, key_provider=key_provider_from_url(kek_url), migrate_schema=False)
    settings = Settings(database_url=url, kek_url=kek_url, embedded_workers=0)
    client = TestClient(create_app(runtime=Runtime.build(settings, backend=backend)))
    key = "ptx_abcdefghijkl_" + "s" * 32  # well formed, so it is looked up in the database
    try:
        with capture_logs() as logs:
            ready = client.get("/readyz")
            call = client.get("/v1/me", headers=auth(key))
    finally:
        backend.close()
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == {"status": "failing", "error": "OperationalError"}
    assert ready.json()["checks"]["limit_store"] == {"status": "ok"}
    assert call.status_code == 503
    assert call.json()["error"]["code"] == "storage_error"
    [failed] = events(logs, "dependency_failed")
    assert failed["error"] == "storage_error" and failed["cause_type"] == "OperationalError"
    assert failed["path"] == "/v1/me" and failed["status"] == 503
    assert "tenant_id" not in failed  # the key could not even be looked up
    assert_no_secret(logs, key)


# --- a tenant call that fails on a dependency -------------------------------------------


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_a_dead_limit_store_answers_503_limit_store_unavailable_and_is_logged(
    make_client: Callable[..., TestClient], deployment: Deployment
) -> None:
    client = make_client(rate_limit_storage=f"redis://127.0.0.1:{closed_port()}/0")
    tenant = tenant_on(client, deployment)
    with capture_logs() as logs:
        r = client.get("/v1/me", headers=tenant.h)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "limit_store_unavailable"
    assert "Retry-After" not in r.headers  # nobody knows when Redis comes back
    [failed] = events(logs, "dependency_failed")
    assert failed["tenant_id"] == tenant.id
    assert failed["key_id"] == tenant.key_id
    assert failed["error"] == "limit_store_unavailable"
    assert failed["path"] == "/v1/me"
    assert failed["cause_type"] == "ConnectionError" and "Connection refused" in failed["cause"]
    assert failed["request_id"] == r.headers["X-Request-ID"]
    [line] = events(logs, "request")
    assert (line["status"], line["error"], line["tenant_id"]) == (503, "limit_store_unavailable", tenant.id)
    assert_no_secret(logs, tenant.key)


@pytest.mark.only_deployments("sqlite-pool")
def test_a_database_failure_inside_a_route_is_503_and_logged(
    client: TestClient, make_tenant: Any, deployment: Deployment
) -> None:
    tenant = make_tenant("acme")
    # Damage the SQLite database under the running server (its schema loses a table).
    with sqlite3.connect(Path(deployment.db_url.removeprefix("sqlite:///"))) as db:
        db.execute("DROP TABLE agents")
    with capture_logs() as logs:
        r = client.get("/v1/agents", headers=tenant.h)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "storage_error"
    [failed] = events(logs, "dependency_failed")
    assert (failed["tenant_id"], failed["route"], failed["error"]) == (
        tenant.id,
        "/v1/agents",
        "storage_error",
    )
    assert failed["cause_type"] == "OperationalError" and "agents" in failed["cause"]
    assert "SELECT" not in failed["cause"]  # the statement and its parameters are not logged
    assert_no_secret(logs, tenant.key)


# --- the request log --------------------------------------------------------------------


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_every_request_is_logged_with_the_request_id_of_its_response(
    client: TestClient, make_tenant: Any
) -> None:
    tenant = make_tenant("acme")
    with capture_logs() as logs:
        health = client.get("/healthz")
        listed = client.get("/v1/agents?limit=3&access_token=sekrit", headers=tenant.h)
        refused = client.get("/v1/agents", headers=auth("ptx_abcdefghijkl_nope"))
    lines = events(logs, "request")
    assert [e["request_id"] for e in lines] == [r.headers["X-Request-ID"] for r in (health, listed, refused)]
    assert len({e["request_id"] for e in lines}) == 3
    h, t, x = lines
    assert (h["method"], h["path"], h["status"]) == ("GET", "/healthz", 200)
    assert isinstance(h["duration_ms"], float) and h["duration_ms"] >= 0
    assert "tenant_id" not in h and "key_id" not in h
    assert (t["path"], t["route"], t["status"]) == ("/v1/agents", "/v1/agents", 200)
    assert (t["tenant_id"], t["key_id"]) == (tenant.id, tenant.key_id)
    assert (x["status"], x["error"]) == (401, "unauthenticated")
    assert "sekrit" not in repr(logs)  # the query string is never logged
    assert_no_secret(logs, tenant.key)
    assert_no_secret(logs, "ptx_abcdefghijkl_nope")


@pytest.mark.only_deployments("sqlite-pool")
@pytest.mark.parametrize("given", ["req-42", "0b9f6a1e-2c1d-4e5f-8a7b-9c0d1e2f3a4b", "a.b_c:D-9", "x" * 64])
def test_a_safe_incoming_request_id_is_echoed(client: TestClient, given: str) -> None:
    with capture_logs() as logs:
        r = client.get("/healthz", headers={"X-Request-ID": given})
    assert r.headers["X-Request-ID"] == given
    assert events(logs, "request")[0]["request_id"] == given


@pytest.mark.only_deployments("sqlite-pool")
@pytest.mark.parametrize("given", ["", "a b", "<script>", "x" * 65, "id;drop", "caf\u00e9"])
def test_an_unsafe_incoming_request_id_is_replaced(client: TestClient, given: str) -> None:
    with capture_logs() as logs:
        r = client.get("/healthz", headers={"X-Request-ID": given.encode("utf-8")})
    made = r.headers["X-Request-ID"]
    assert made != given and made
    assert all(ch.isalnum() or ch in "._:-" for ch in made) and len(made) <= 64
    assert events(logs, "request")[0]["request_id"] == made


@pytest.mark.only_deployments("sqlite-pool")
def test_an_unhandled_exception_is_logged_by_type_with_status_500(runtime: Runtime) -> None:
    app = create_app(runtime=runtime)

    def boom() -> None:
        raise RuntimeError("secret detail")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client, capture_logs() as logs:
        r = client.get("/boom")
    assert r.status_code == 500
    [failed] = events(logs, "unhandled_exception")
    assert failed["error_type"] == "RuntimeError" and failed["path"] == "/boom"
    [line] = events(logs, "request")
    assert line["status"] == 500 and line["request_id"] == failed["request_id"]
    assert "secret detail" not in repr(logs)
