"""A real uvicorn server of the app in a thread, for tests that drive it over HTTP with
real clients (the ``openai`` SDK, httpx streams, disconnects)."""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
import time
from typing import Any

import httpx
import openai
import uvicorn
from starlette.types import Receive, Scope, Send

from patinox.api import create_app
from patinox.runtime import Runtime
from tests.conftest import auth


class Server:
    """A uvicorn server of the app in a thread, counting requests by path."""

    def __init__(self, runtime: Runtime) -> None:
        app = create_app(runtime=runtime)
        self.requests: collections.Counter[str] = collections.Counter()
        self.clients: list[openai.OpenAI] = []

        async def counting(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                self.requests[scope["path"]] += 1
            await app(scope, receive, send)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(counting, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.srv = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.srv.serve()), daemon=True)
        self.thread.start()
        while not self.srv.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.operator = runtime.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret

    def tenant(self, name: str, **spec: Any) -> Tenant:
        r = self.http.post("/admin/tenants", json={"name": name, **spec}, headers=auth(self.operator))
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        r = self.http.post(f"/admin/tenants/{tid}/keys", json={"name": "k"}, headers=auth(self.operator))
        assert r.status_code == 201, r.text
        return Tenant(self, tid, r.json()["key"])

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.http.close()
        self.srv.should_exit = True
        self.thread.join(timeout=30)


class Tenant:
    def __init__(self, server: Server, tenant_id: str, key: str) -> None:
        self.server, self.id, self.key, self.h = server, tenant_id, key, auth(key)

    def agent(self, name: str, **spec: Any) -> str:
        body = {"name": name, "model": "simulated:instant", **spec}
        r = self.server.http.post("/v1/agents", json=body, headers=self.h)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def client(self, **kw: Any) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=self.server.url + "/v1", api_key=self.key, _strict_response_validation=True, **kw
        )
        self.server.clients.append(client)
        return client

    def async_client(self, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.server.url + "/v1", api_key=self.key, _strict_response_validation=True, **kw
        )

    def get(self, path: str) -> Any:
        r = self.server.http.get(path, headers=self.h)
        assert r.status_code == 200, r.text
        return r.json()
