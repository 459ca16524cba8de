"""Pre-warmed sandboxed templates ("spares"): a new ``container`` tenant's first pool takes
one that the supervisor started before the tenant existed, and binds it (its uid, its
directory at ``/work``, its processes in the tenant's cgroup); the supervisor refills."""

from __future__ import annotations

import json
import os
import time

import pytest

from patinox.isolation.spares import Spare
from patinox.isolation.supervisor import PoolSupervisor
from patinox.runtime import Runtime
from tests.conftest import Deployment
from tests.isolation.test_container import code_result, python_call, run, sandboxed_tenant

pytestmark = pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("spare templates need root (CI runs these tests as root)")


def ready_spare(
    supervisor: PoolSupervisor, *, other_than: frozenset[str] | set[str] = frozenset(), timeout_s: float = 90
) -> Spare:
    """A spare whose template is up (warmed and answering), not one of ``other_than``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for spare in supervisor.spares():
            if spare.name not in other_than and spare.template.alive:
                return spare
        time.sleep(0.05)
    raise AssertionError(f"no ready spare in {timeout_s} s: {supervisor.spares()}")


def uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


PROBE = (
    "import os, json; open('mine.txt', 'w').write('x'); s = os.statvfs('/work');"
    "print(json.dumps({'uid': os.getuid(), 'size': s.f_blocks * s.f_frsize, 'files': os.listdir('/work')}))"
)


def test_a_new_container_tenant_binds_a_prewarmed_spare_and_the_pool_refills(
    runtime: Runtime, deployment: Deployment
) -> None:
    assert runtime.process_executor is not None
    supervisor = runtime.process_executor.supervisor
    assert supervisor.settings.spare_templates == 1
    first = ready_spare(supervisor)
    warmed = (first.template.pid, first.template.start_s)

    ctx, agent = sandboxed_tenant(runtime, deployment, name="s-one")
    row = run(runtime, ctx, agent, python_call(PROBE))
    pool = supervisor.pools()[ctx.tenant_id]
    # The tenant's template is the spare's, running as the spare's uid, now the tenant's.
    assert pool.template is first.template and pool.uid == first.uid == pool.gid
    assert first.name not in {s.name for s in supervisor.spares()}
    assert row["status"] == "succeeded", row
    result = code_result(row)
    assert result["exit_status"] == 0, result
    seen = json.loads(result["stdout"])
    page = os.sysconf("SC_PAGE_SIZE")
    disk = -(-ctx.limits.disk_bytes // page) * page
    assert seen["uid"] == first.uid and seen["size"] == disk and seen["files"] == ["mine.txt"], seen
    # Its /work is the tenant's directory on the host: disk_bytes big, the tenant uid's.
    workdir = supervisor.workdirs.path(ctx.tenant_id)
    info, vfs = os.stat(workdir), os.statvfs(workdir)
    assert (info.st_uid, info.st_gid) == (first.uid, first.uid)
    assert vfs.f_blocks * vfs.f_frsize == disk
    assert os.stat(workdir / "mine.txt").st_uid == first.uid
    assert not supervisor.workdirs.path(first.name).exists()  # the spare's own path is gone
    # No cold template start on this path: the spare's own template, warmed before the
    # tenant existed, served the first run (a restart would give a new pid and start time).
    assert (pool.template.pid, pool.template.start_s) == warmed and pool.template.alive
    # Its processes (bwrap's, the template) are in the tenant's cgroup; the spare's is gone.
    if supervisor.cgroups is not None:
        assert pool.cgroup is not None
        held = pool.cgroup.child("template").pids()
        assert held and first.uid in {uid_of(pid) for pid in held}, held
        assert first.name not in supervisor.cgroups.tenants()
        for proc in pool.processes():
            assert proc.host_pid in pool.cgroup.pids()

    # The pool refilled: a second tenant gets another spare, uid and directory.
    second = ready_spare(supervisor, other_than={first.name})
    assert second.uid != first.uid
    other, other_agent = sandboxed_tenant(runtime, deployment, name="s-two")
    other_pool = supervisor.pools()[other.tenant_id]
    assert other_pool.template is second.template and other_pool.template is not pool.template
    assert other_pool.uid == second.uid and other_pool.workdir != pool.workdir
    row = run(runtime, other, other_agent, python_call(PROBE))
    assert row["status"] == "succeeded", row
    seen = json.loads(code_result(row)["stdout"])
    assert seen["uid"] == second.uid and seen["files"] == ["mine.txt"], seen
    # And refills again.
    ready_spare(supervisor, other_than={first.name, second.name})


def test_a_tenant_that_already_has_an_identity_gets_a_template_of_its_own(
    runtime: Runtime, deployment: Deployment
) -> None:
    """A tenant with a uid already (e.g. moved up from ``process``: its files are that
    uid's) starts its own template; the spare stays for a new tenant."""
    assert runtime.process_executor is not None
    supervisor = runtime.process_executor.supervisor
    spare = ready_spare(supervisor)
    ctx, agent = sandboxed_tenant(runtime, deployment, name="s-moved")
    assert run(runtime, ctx, agent, "hello")["status"] == "succeeded"
    supervisor.stop_pool(ctx.tenant_id)
    # Taken by the first pool; a restarted pool (same uid, same files) keeps the tenant's.
    pool = supervisor.pool(ctx.tenant_id, ctx.limits, level=ctx.isolation_level)
    assert pool.uid == spare.uid and pool.template is not spare.template
    row = run(runtime, ctx, agent, python_call(PROBE))
    assert row["status"] == "succeeded", row
    assert json.loads(code_result(row)["stdout"])["uid"] == spare.uid


def test_no_spares_when_turned_off(runtime: Runtime) -> None:
    from dataclasses import replace

    assert runtime.process_executor is not None
    settings = replace(runtime.process_executor.supervisor.settings, spare_templates=0)
    supervisor = PoolSupervisor.on_this_host(settings, cgroup_prefix="patinox-test-nospares")
    try:
        time.sleep(0.2)
        assert supervisor.spares() == []
    finally:
        supervisor.close()
