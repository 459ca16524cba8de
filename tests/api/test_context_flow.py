"""The tenant context through HTTP requests: set from the key, never carried to the next request."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from patinox.tenancy import current_tenant, current_tenant_or_none


def test_no_request_starts_with_a_previous_requests_tenant(client: TestClient, make_tenant: Any) -> None:
    app = client.app
    seen_public: list[Any] = []

    @app.get("/probe-public")  # type: ignore[attr-defined, untyped-decorator]
    def probe_public() -> dict[str, Any]:
        ctx = current_tenant_or_none()
        seen_public.append(ctx)
        return {"tenant": None if ctx is None else ctx.tenant_id}

    @app.get("/v1/probe")  # type: ignore[attr-defined, untyped-decorator]
    async def probe() -> dict[str, str]:
        return {"tenant": current_tenant().tenant_id}

    a = make_tenant("alpha")
    b = make_tenant("beta")
    for _ in range(5):
        assert client.get("/v1/probe", headers=a.h).json() == {"tenant": a.id}
        assert client.get("/probe-public").json() == {"tenant": None}
        assert client.get("/v1/probe", headers=b.h).json() == {"tenant": b.id}
        assert client.get("/probe-public").json() == {"tenant": None}
    assert seen_public == [None] * 10


def test_sync_routes_in_the_threadpool_see_the_request_tenant(client: TestClient, make_tenant: Any) -> None:
    app = client.app

    @app.get("/v1/probe-sync")  # type: ignore[attr-defined, untyped-decorator]
    def probe_sync() -> dict[str, str]:
        return {"tenant": current_tenant().tenant_id}

    a = make_tenant("alpha")
    b = make_tenant("beta")
    for _ in range(5):
        assert client.get("/v1/probe-sync", headers=a.h).json() == {"tenant": a.id}
        assert client.get("/v1/probe-sync", headers=b.h).json() == {"tenant": b.id}


def test_async_runs_poll_to_completion(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    b = make_tenant("beta")
    agent = a.agent("x", model="simulated:ttft_ms=50,tpot_ms=0")
    r = a.run(agent, "async please", output_tokens=7, mode="async")
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    assert r.headers["Location"] == f"/v1/runs/{run_id}"
    assert r.json()["status"] in ("queued", "running")
    assert client.get(f"/v1/runs/{run_id}", headers=b.h).status_code == 404
    for _ in range(500):
        got = client.get(f"/v1/runs/{run_id}", headers=a.h).json()
        if got["status"] in ("succeeded", "failed"):
            break
    assert got["status"] == "succeeded", got
    assert got["output_tokens"] == 7 and got["simulated"] is True
    assert got["output"].startswith("[simulated]")
