"""The ``container`` level end to end: a tenant's execution processes run in its bubblewrap
sandbox (forked from a template of its own in there), are placed in their cgroups by the
host, and give runs the ``python`` tool, each call a fresh child in the sandbox."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import PatinoxError
from patinox.runtime import Runtime
from patinox.tenancy import IsolationLevel, LimitOverrides, StorageModel, TenantContext
from tests.conftest import Deployment

pytestmark = pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the container level's tests need root (CI runs them as root)")


def sandboxed_tenant(
    runtime: Runtime,
    deployment: Deployment,
    *,
    name: str,
    level: IsolationLevel = IsolationLevel.CONTAINER,
    tools: tuple[str, ...] = ("python", "memory_put", "memory_get"),
    **limits: Any,
) -> tuple[TenantContext, str]:
    """A tenant at ``level`` with an agent that has the ``python`` tool."""
    assert runtime.process_executor is not None
    runtime.process_executor.hosts_pools = True
    t = runtime.tenants.create(
        TenantSpec(
            name=name,
            isolation_level=level,
            storage_model=StorageModel(deployment.storage_model),
            limits=LimitOverrides(**limits),
        ),
        actor="test",
    )
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext) and ctx.isolation_level is level
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant", tools=list(tools)))
    return ctx, str(agent["id"])


def python_call(code: str) -> str:
    return "/call python " + json.dumps({"code": code})


def run(runtime: Runtime, ctx: TenantContext, agent_id: str, prompt: str) -> dict[str, Any]:
    """The run's stored row (status, output, error...) whether it succeeded or failed."""
    try:
        row = asyncio.run(runtime.runs.start(ctx, agent_id, RunRequest(input=prompt, output_tokens=20)))
    except PatinoxError as err:
        run_id = err.fields.get("run_id")
        assert run_id, err
        row = runtime.backend.tenant_store(ctx).get_run(run_id)
    return dict(row)


def code_result(row: dict[str, Any]) -> dict[str, Any]:
    """The python tool's result in a run's output."""
    out = str(row["output"])
    start = out.index("python = ") + len("python = ")
    value, _ = json.JSONDecoder().raw_decode(out[start:])
    return dict(value)


def test_python_runs_inside_the_tenants_sandbox(runtime: Runtime, deployment: Deployment) -> None:
    ctx, agent = sandboxed_tenant(runtime, deployment, name="c-inside")
    code = (
        "import os, json; open('f.txt', 'w').write('x');"
        "print(json.dumps({'uid': os.getuid(), 'cwd': os.getcwd(), 'host': os.uname().nodename,"
        " 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),"
        " 'sys': os.path.exists('/sys/fs/cgroup'), 'files': os.listdir('.')}))"
    )
    row = run(runtime, ctx, agent, python_call(code))
    assert row["status"] == "succeeded", row
    result = code_result(row)
    assert result["exit_status"] == 0, result
    seen = json.loads(result["stdout"])
    assert seen["uid"] != 0 and seen["cwd"] == "/work" and seen["host"] == "patinox-sandbox"
    assert seen["sys"] is False and "f.txt" in seen["files"]
    # bwrap's init, the template, the execution process, the code's child: nothing else.
    assert max(seen["pids"]) < 50 and 1 in seen["pids"], seen["pids"]


PROBE = r"""
import json, os, socket
def err(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return type(e).__name__[:12]
def connect(port):
    with socket.socket() as s:
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
def read(path):
    if os.path.isdir(path):
        os.listdir(path)
    with open(path, "rb") as f:
        f.read()
def write(path):
    with open(path, "w") as f:
        f.write("max")
pids = [p for p in os.listdir("/proc") if p.isdigit()]
names = {open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0].decode().rsplit("/", 1)[-1] for p in pids}
print(json.dumps([err(lambda: connect(5432)), err(lambda: connect(6379)), err(lambda: read(DB)),
    err(lambda: read(KEK)), err(lambda: read(OTHER)),
    err(lambda: write("/sys/fs/cgroup/pids/pids.max")), len(pids), sorted(names)]))
"""


def test_from_inside_the_host_services_files_and_processes_are_out_of_reach(
    runtime: Runtime, deployment: Deployment
) -> None:
    other, _ = sandboxed_tenant(runtime, deployment, name="c-other")
    ctx, agent = sandboxed_tenant(runtime, deployment, name="c-probe")
    assert runtime.process_executor is not None
    supervisor = runtime.process_executor.supervisor
    # The other tenant's directory exists on the host, with a file in it.
    other_dir = supervisor.workdirs.ensure(
        other.tenant_id, uid=0, gid=0, size_bytes=other.limits.disk_bytes
    ).path
    db = deployment.db_url.removeprefix("sqlite:///")
    kek = runtime.settings.kek_url.removeprefix("file://")
    assert os.path.exists(db) and os.path.exists(kek) and other_dir.is_dir()
    code = PROBE.replace("DB", repr(db)).replace("KEK", repr(kek)).replace("OTHER", repr(str(other_dir)))
    row = run(runtime, ctx, agent, python_call(code))
    assert row["status"] == "succeeded", row
    result = code_result(row)
    assert result["exit_status"] == 0, result
    seen = json.loads(result["stdout"])
    assert "ok" not in seen[:6], seen  # no connection, no read, no write
    # Only the sandbox's processes: bwrap's init, the template, execution processes, this code.
    assert set(seen[7]) <= {"bwrap", "python", "python3"}, seen
    assert seen[6] <= 2 + ctx.limits.execution_processes + 1, seen
