"""``patinox tenants update TENANT --isolation-level LEVEL`` while another process (a server
or worker, here a runtime on a loop in a thread) has runs of the tenant in flight and queued."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from patinox.control import RunRequest
from patinox.errors import RunFailed
from patinox.isolation import process_isolation_available
from patinox.runtime import Runtime, Settings
from patinox.tenancy import TenantContext
from tests.cli.conftest import assert_error, cli, first_json
from tests.conftest import Deployment

ENDLESS = "simulated:ttft_ms=600000,tpot_ms=0"


def until(cond: Callable[[], bool], what: str, guard_s: float = 60.0) -> None:
    deadline = time.monotonic() + guard_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {guard_s:.0f} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def data_dir(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deployment: Deployment,
    exec_root: Path,
    exec_cgroup_prefix: str,
) -> Path:
    """An initialised deployment on ``deployment``'s database."""
    if deployment.postgres:
        monkeypatch.setenv("PATINOX_DATABASE_URL", deployment.db_url)
        monkeypatch.setenv("PATINOX_OWNER_URL", str(deployment.owner_url))
    monkeypatch.setenv("PATINOX_EXEC_ROOT", str(exec_root))
    monkeypatch.setenv("PATINOX_CGROUP_PREFIX", exec_cgroup_prefix)
    ddir = tmp_path / "deployment"
    result = cli("init", "--data-dir", str(ddir), "--key-file", str(tmp_path / "operator.key"))
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("PATINOX_DATA_DIR", str(ddir))
    return ddir


class Server:
    """Another process of the deployment: a runtime whose runs execute on a loop in a thread,
    watching tenants as ``patinox serve`` and ``patinox worker`` do."""

    def __init__(self, data_dir: Path) -> None:
        self.rt = Runtime.build(Settings.for_data_dir(data_dir))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.watch = self.submit(self.rt.runs.watch_tenants(interval_s=0.1))
        self.worker: Future[Any] | None = None
        self.stop = asyncio.Event()

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def ctx(self, tid: str) -> TenantContext:
        return TenantContext.for_tenant(
            self.rt.backend.get_tenant(tid), principal="cli", scopes={"runs:write"}
        )

    def start_worker(self) -> None:
        async def go() -> None:
            await self.rt.worker(concurrency=4).run(self.stop)

        self.worker = self.submit(go())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        if self.worker is not None:
            self.worker.result(30)
        self.watch.cancel()
        self.submit(self.rt.runs.shutdown()).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.rt.close()
        self.rt.backend.close()


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    s = Server(data_dir)
    yield s
    s.close()


# Each command's runtime is left to the end of its process, as the command line does; here
# that is the test's, where PostgreSQL connections would warn when collected.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_namespace_to_process_and_back_from_the_command_line(data_dir: Path, server: Server) -> None:
    if not process_isolation_available()[0]:
        pytest.fail("this host cannot run the process isolation level (Linux with fork is needed; CI has it)")
    assert cli("tenants", "create", "acme", "--plan", "pro").exit_code == 0
    assert cli("agents", "create", "acme", "quick", "--model", "simulated:instant").exit_code == 0
    assert cli("agents", "create", "acme", "endless", "--model", ENDLESS).exit_code == 0
    tid = str(first_json(cli("tenants", "show", "acme").stdout)["id"])
    rt = server.rt
    agents = {a["name"]: a["id"] for a in rt.backend.acting_on(tid).list_agents()}

    def run(agent: str, mode: str = "sync") -> Future[Any]:
        req = RunRequest(input="work", output_tokens=1, mode=mode)  # type: ignore[arg-type]
        return server.submit(rt.runs.start(server.ctx(tid), agents[agent], req))

    def status(run_id: str) -> str:
        return str(rt.backend.acting_on(tid).get_run(run_id)["status"])

    # A run in flight in the other process that outlives the drain, and queued runs (no
    # worker claims them yet).
    stuck = run("endless")
    until(lambda: len(rt.backend.acting_on(tid).list_runs(limit=10)) == 1, "the run in flight")
    queued = [run("quick", "async").result(10)["id"] for _ in range(3)]

    result = cli("tenants", "update", "acme", "--isolation-level", "process", "--drain-timeout", "1")
    assert result.exit_code == 0, result.output
    assert first_json(result.stdout)["isolation_level"] == "process"
    with pytest.raises(RunFailed) as err:
        stuck.result(30)
    assert err.value.reason == "isolation_level_change"
    assert all(status(r) == "queued" for r in queued)  # none lost, none started at the old level

    server.start_worker()  # the queued runs execute at the new level
    until(lambda: all(status(r) == "succeeded" for r in queued), "the queued runs")
    assert run("quick").result(30)["status"] == "succeeded"
    assert rt.process_executor is not None and tid in rt.process_executor.supervisor.pools()

    result = cli("tenants", "update", "acme", "--isolation-level", "namespace")
    assert result.exit_code == 0, result.output
    assert first_json(result.stdout)["isolation_level"] == "namespace"
    assert run("quick").result(30)["status"] == "succeeded"

    audit = [
        a
        for a in rt.backend.list_audit(tid, limit=100, after_seq=0)
        if a["action"] == "tenant.isolation_level"
    ]
    assert [(a["detail"]["old_level"], a["detail"]["new_level"]) for a in audit] == [
        ("namespace", "process"),
        ("process", "namespace"),
    ]
    assert [(a["detail"]["runs_drained"], a["detail"]["runs_cancelled"]) for a in audit] == [(0, 1), (0, 0)]
    assert rt.queue.depth(tid) == 0 and not rt.queue.held(tid)
    gc.collect()  # the commands' runtimes, within this test's warning filters


def test_refusals_on_the_command_line(data_dir: Path) -> None:
    assert cli("tenants", "create", "acme").exit_code == 0
    assert_error(cli("tenants", "update", "acme", "--drain-timeout", "3"), "--isolation-level")
    assert_error(
        cli("tenants", "update", "acme", "--isolation-level", "bunker"), "--isolation-level: must be"
    )
    rt = Runtime.build(Settings.for_data_dir(data_dir))
    try:
        missing = [
            lvl for lvl in ("container", "dedicated") if lvl not in {x.value for x in rt.executors.levels}
        ]
        tid = str(first_json(cli("tenants", "show", "acme").stdout)["id"])
        if missing:
            assert_error(
                cli("tenants", "update", "acme", "--isolation-level", missing[-1]), "is not available"
            )
        rt.backend.update_tenant(tid, {"isolation_level": "container"})
        assert (
            cli(
                "agents", "create", "acme", "coder", "--model", "simulated:instant", "--tool", "python"
            ).exit_code
            == 0
        )
        assert_error(
            cli("tenants", "update", "acme", "--isolation-level", "namespace"),
            "coder",
            "need isolation level 'container'",
        )
        assert rt.backend.get_tenant(tid)["isolation_level"] == "container"
    finally:
        rt.close()
