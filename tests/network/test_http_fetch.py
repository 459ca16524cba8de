"""The ``http_fetch`` tool end to end, at the ``namespace``, ``process`` and ``container``
levels (the sandbox has no network: its fetches are made by the host): a run
reaches a host on its tenant's egress allow-list through the outbound-request guard on the
host, and every refused target (loopback, a private range, the cloud metadata address, a
name resolving to loopback, a redirect to any of them, a host off the list) is a failed tool
result, with no request reaching the local server listening there.

The operator allows only 127.0.0.2/32 (``EgressSettings.allowed_ranges``); the allowed
server listens there, a second server on 127.0.0.1 stands for a service of the host that a
tenant must never reach.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from patinox.agents import Conversation
from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import ConfigurationError
from patinox.isolation import Template
from patinox.network import EgressSettings, OutboundPolicy
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend
from patinox.tenancy import IsolationLevel, LimitOverrides, StorageModel, TenantContext
from tests.conftest import Deployment

LEVELS = (IsolationLevel.NAMESPACE, IsolationLevel.PROCESS, IsolationLevel.CONTAINER)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect-to/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"pong from the allowed host"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    seen: list[str]


def _serve(address: str) -> Iterator[_Server]:
    server = _Server((address, 0), _Handler)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def allowed_server() -> Iterator[_Server]:
    yield from _serve("127.0.0.2")


@pytest.fixture
def loopback_server() -> Iterator[_Server]:
    yield from _serve("127.0.0.1")


@pytest.fixture
def egress_runtime(
    deployment: Deployment,
    backend: SqlBackend,
    kek_url: str,
    exec_template: Template,
    exec_root: Path,
    exec_cgroup_prefix: str,
) -> Iterator[Runtime]:
    settings = Settings(
        database_url=deployment.db_url,
        owner_url=deployment.owner_url,
        kek_url=kek_url,
        exec_root=exec_root,
        exec_cgroup_prefix=exec_cgroup_prefix,
        egress=EgressSettings(
            allowed_ranges=OutboundPolicy.ranges(["127.0.0.2/32"]), schemes=frozenset({"http"}), timeout_s=10
        ),
    )
    rt = Runtime.build(settings, backend=backend, template=exec_template)
    assert rt.process_executor is not None
    rt.process_executor.hosts_pools = True  # as in a process that executes runs
    yield rt
    rt.close()


def _tenant(
    runtime: Runtime, level: IsolationLevel, deployment: Deployment, hosts: list[str]
) -> TenantContext:
    spec = TenantSpec(
        name=f"fetch-{level.value}",
        isolation_level=level,
        storage_model=StorageModel(deployment.storage_model),
        limits=LimitOverrides(egress_hosts=tuple(hosts), max_tool_calls_per_run=20),
    )
    t = runtime.tenants.create(spec, actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext) and ctx.isolation_level is level
    return ctx


def _calls(output: str) -> list[str]:
    """The tool results in a simulated reply, one a call, in call order."""
    return output.split("http_fetch")[1:]


def _run(runtime: Runtime, ctx: TenantContext, urls: list[str]) -> dict[str, Any]:
    agent = runtime.agents.create(
        ctx, AgentSpec(name="fetcher", model="simulated:instant", tools=["http_fetch"])
    )
    prompt = "\n".join(f"/call http_fetch {json.dumps({'url': url})}" for url in urls)
    run = asyncio.run(runtime.runs.start(ctx, str(agent["id"]), RunRequest(input=prompt, output_tokens=2000)))
    return dict(run)


@pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)
@pytest.mark.parametrize("level", LEVELS)
def test_refused_targets_never_reached_and_the_allowed_host_answers(
    egress_runtime: Runtime,
    deployment: Deployment,
    level: IsolationLevel,
    allowed_server: _Server,
    loopback_server: _Server,
) -> None:
    allowed = f"http://127.0.0.2:{allowed_server.server_port}"
    loopback_port = loopback_server.server_port
    # Every host is on the tenant's list: only the deployment's address guard refuses them.
    ctx = _tenant(
        egress_runtime,
        level,
        deployment,
        ["127.0.0.2", "127.0.0.1", "localhost", "10.0.0.1", "169.254.169.254"],
    )
    refused = [
        f"http://127.0.0.1:{loopback_port}/loopback",
        f"http://localhost:{loopback_port}/name-resolving-to-loopback",
        "http://10.0.0.1/private",
        "http://169.254.169.254/latest/meta-data/",
        f"{allowed}/redirect-to/http://127.0.0.1:{loopback_port}/redirected",
        f"{allowed}/redirect-to/http://169.254.169.254/latest/meta-data/",
        f"{allowed}/redirect-to/http://10.0.0.1/private",
    ]
    run = _run(egress_runtime, ctx, [f"{allowed}/ping", *refused])
    assert run["status"] == "succeeded", run
    results = _calls(run["output"])
    assert len(results) == 1 + len(refused), run["output"]
    assert results[0].startswith(" = ") and "pong from the allowed host" in results[0], results[0]
    for url, result in zip(refused, results[1:], strict=True):
        assert result.startswith(" failed: host "), (url, result)
        assert "not a public address" in result, (url, result)
    # Nothing reached the host's own service; the allowed server saw the ping and the three
    # redirecting requests, never a redirect's refused target.
    assert loopback_server.seen == []
    assert allowed_server.seen == ["/ping"] + [u.removeprefix(allowed) for u in refused[4:]]


@pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)
@pytest.mark.parametrize("level", LEVELS)
def test_a_host_off_the_tenants_list_is_refused(
    egress_runtime: Runtime, deployment: Deployment, level: IsolationLevel, allowed_server: _Server
) -> None:
    ctx = _tenant(egress_runtime, level, deployment, ["api.example.com"])
    run = _run(egress_runtime, ctx, [f"http://127.0.0.2:{allowed_server.server_port}/ping"])
    (result,) = _calls(run["output"])
    assert "not on the tenant's allow-list" in result, result
    assert allowed_server.seen == []


@pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)
def test_an_empty_allow_list_reaches_nothing(
    egress_runtime: Runtime, deployment: Deployment, allowed_server: _Server
) -> None:
    ctx = _tenant(egress_runtime, IsolationLevel.NAMESPACE, deployment, [])
    assert ctx.limits.egress_hosts == ()
    run = _run(egress_runtime, ctx, [f"http://127.0.0.2:{allowed_server.server_port}/ping"])
    (result,) = _calls(run["output"])
    assert "not on the tenant's allow-list" in result and allowed_server.seen == []


def test_allow_list_entries_are_normalised_and_checked() -> None:
    got = LimitOverrides(egress_hosts=("Bücher.Example.", "*.API.example.com", "127.0.0.2", "localhost"))
    assert got.egress_hosts == ("xn--bcher-kva.example", "*.api.example.com", "127.0.0.2", "localhost")
    for bad in ("exa mple.com", "*.10.0.0.1", "-bad.example.com", "intranet", "a/b.example.com"):
        with pytest.raises(ValueError, match="egress_hosts"):
            LimitOverrides(egress_hosts=(bad,))


def test_operator_settings_from_the_environment() -> None:
    env = {
        "PATINOX_EGRESS_ALLOWED_RANGES": "10.1.0.0/16, 127.0.0.2",
        "PATINOX_EGRESS_DENIED_RANGES": "203.0.113.0/24",
        "PATINOX_EGRESS_SCHEMES": "https,http",
        "PATINOX_EGRESS_MAX_BYTES": "4096",
    }
    settings = EgressSettings.from_env(env)
    assert [str(n) for n in settings.allowed_ranges] == ["10.1.0.0/16", "127.0.0.2/32"]
    assert [str(n) for n in settings.denied_ranges] == ["203.0.113.0/24"]
    assert settings.schemes == {"http", "https"} and settings.max_response_bytes == 4096
    assert EgressSettings.from_env({}) == EgressSettings()
    for bad in ({"PATINOX_EGRESS_ALLOWED_RANGES": "not-a-range"}, {"PATINOX_EGRESS_SCHEMES": "ftp"}):
        with pytest.raises(ConfigurationError):
            EgressSettings.from_env(bad)


@pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)
def test_a_run_with_a_conversation_fetches_under_the_same_policy(
    egress_runtime: Runtime, deployment: Deployment, allowed_server: _Server, loopback_server: _Server
) -> None:
    """The runs the run service executes itself (conversations, streamed runs: the
    OpenAI-compatible route) get the same egress as the executors give theirs."""
    ctx = _tenant(egress_runtime, IsolationLevel.NAMESPACE, deployment, ["127.0.0.2", "127.0.0.1"])
    agent = egress_runtime.agents.create(
        ctx, AgentSpec(name="chat", model="simulated:instant", tools=["http_fetch"])
    )
    urls = [
        f"http://127.0.0.2:{allowed_server.server_port}/ping",
        f"http://127.0.0.1:{loopback_server.server_port}/loopback",
    ]
    prompt = "\n".join(f"/call http_fetch {json.dumps({'url': url})}" for url in urls)
    run = asyncio.run(
        egress_runtime.runs.start(
            ctx,
            str(agent["id"]),
            RunRequest(input=prompt, output_tokens=400),
            conversation=Conversation(history=(("user", "earlier turn"),)),
        )
    )
    allowed, refused = _calls(run["output"])
    assert "pong from the allowed host" in allowed and refused.startswith(" failed: host "), run["output"]
    assert allowed_server.seen == ["/ping"] and loopback_server.seen == []
