"""Through a real uvicorn server (h11, keep-alive): no request inherits the tenant of the
request before it on the same connection.

uvicorn's h11 protocol can hand a request the context of the previous request's task when
reading was paused for a large body (CPython gh-140947, uvicorn #2167). The middleware
clears any inherited tenant at the start of every request, whatever the server does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from patinox.api import create_app
from patinox.runtime import Runtime
from patinox.tenancy import current_tenant_or_none
from tests.conftest import auth

pytestmark = pytest.mark.only_deployments("sqlite-pool")


@pytest.fixture
def server(runtime: Runtime) -> Iterator[str]:
    big_bodies = Runtime.build(
        dataclasses.replace(runtime.settings, max_body_bytes=4 * 1024 * 1024), backend=runtime.backend
    )
    app = create_app(runtime=big_bodies)

    @app.get("/probe-public")  # type: ignore[untyped-decorator]
    def probe_public() -> dict[str, Any]:
        ctx = current_tenant_or_none()
        return {"tenant": None if ctx is None else ctx.tenant_id}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve()), daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_no_request_inherits_a_tenant_on_a_keep_alive_connection(server: str, runtime: Runtime) -> None:
    operator_key = runtime.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret
    with httpx.Client(base_url=server, timeout=30) as c:
        tenants = []
        for name in ("alpha", "beta"):
            t = c.post("/admin/tenants", json={"name": name}, headers=auth(operator_key)).json()
            k = c.post(
                f"/admin/tenants/{t['id']}/keys", json={"name": "k"}, headers=auth(operator_key)
            ).json()
            tenants.append((t["id"], auth(k["key"])))
        big = "word " * 200_000  # ~1 MB: uvicorn pauses reading while the app consumes it
        for i in range(6):
            _, h = tenants[i % 2]
            r = c.put(f"/v1/memory/k{i}", json={"value": big[:900_000]}, headers=h)
            assert r.status_code == 200, r.text
            p = c.get("/probe-public")
            assert p.status_code == 200, p.text
            assert p.json() == {"tenant": None}
            other_tid, other_h = tenants[(i + 1) % 2]
            me = c.get("/v1/me", headers=other_h)
            assert me.status_code == 200, me.text
            assert me.json()["tenant_id"] == other_tid
