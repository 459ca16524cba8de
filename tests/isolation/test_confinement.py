"""An execution process holds nothing of the host's: started by root, it runs as its
tenant's own unprivileged uid with no capability and ``no_new_privs``, in its tenant's
directory, with its channel as its only file besides stdio and no secret in its
environment; with those credentials the KEK, the database and the deployment directory
cannot be read. It loads no storage or control-plane code, and nothing it is outlives a
host killed with ``kill -9``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patinox.isolation import PoolSettings, PoolSupervisor, Template
from patinox.isolation.execution import ExecutionProcess
from patinox.isolation.pool import TenantPool
from patinox.runtime import Runtime
from patinox.tenancy import get_plan

GUARD_S = 60.0  # against hangs only


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "these tests check the identity change of execution processes, which needs root: "
            "run them as root (CI does); as another user processes keep that user's uid, "
            "as `patinox doctor` and the supervisor's start-up line say"
        )


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _fds(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def warm_processes(pool: TenantPool, count: int) -> list[ExecutionProcess]:
    """The pool's processes once ``count`` of them are up (waits, with a guard)."""
    deadline = time.monotonic() + GUARD_S
    while len(procs := pool.processes()) < count:
        assert time.monotonic() < deadline, pool.counts()
        time.sleep(0.02)
    return procs


@pytest.fixture
def supervisor(exec_template: Template, exec_root: Path, exec_cgroup_prefix: str) -> Iterator[PoolSupervisor]:
    sup = PoolSupervisor.on_this_host(
        PoolSettings(exec_root=exec_root), template=exec_template, cgroup_prefix=exec_cgroup_prefix
    )
    yield sup
    sup.close()


def test_an_execution_process_runs_as_its_tenants_uid_without_privileges(
    supervisor: PoolSupervisor, exec_cgroup_prefix: str
) -> None:
    limits = get_plan("free").limits
    one = supervisor.pool("tn_patinoxtestconfinea000000", limits)
    other = supervisor.pool("tn_patinoxtestconfineb000000", limits)
    proc = warm_processes(one, 1)[0]
    status = _status(proc.pid)
    uid, gid = one.uid, one.gid
    assert uid is not None and gid is not None and uid >= 100_000
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4
    assert status["Groups"] == ""
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    # Its own directory, its own; its channel is its only file besides stdio.
    assert one.workdir is not None and os.readlink(f"/proc/{proc.pid}/cwd") == str(one.workdir)
    st = one.workdir.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o700)
    fds = _fds(proc.pid)
    assert fds[0] == fds[1] == "/dev/null" and fds[3].startswith("socket:")
    # Nothing else is inherited from the template (its control socket...): the rest is the
    # process's own event loop (an epoll and its self-pipe), made after it was confined.
    template = _fds(supervisor.template.pid or 0)
    shared = {fd for fd, t in fds.items() if t in template.values() and t.startswith(("socket:", "pipe:"))}
    assert shared == ({2} if fds[2].startswith("pipe:") else set())  # stderr, the host's
    assert all(t.startswith(("socket:", "anon_inode:")) for fd, t in fds.items() if fd > 3), fds
    # Limits of the plan as rlimits.
    limits_text = Path(f"/proc/{proc.pid}/limits").read_text()
    assert f"Max open files            {limits.max_open_files}" in " ".join(limits_text.split("\n"))
    # In a cgroup of its own, below its tenant's.
    assert proc.cgroup is not None, "this host gives no writable cgroup controller: run as root (CI does)"
    groups = {line.split(":")[2] for line in Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()}
    assert f"/{exec_cgroup_prefix}/{one.tenant_id}/{proc.cgroup.name}" in groups
    assert proc.pid in proc.cgroup.pids()
    # Another tenant: another identity.
    assert other.uid not in (None, uid)


def test_no_secret_of_the_host_reaches_an_execution_process(exec_root: Path) -> None:
    template = Template(
        environ={
            "PATH": os.environ["PATH"],
            "PATINOX_DATABASE_URL": "postgresql://patinox:secret@127.0.0.1/db",
            "PATINOX_KEK_URL": "env://PATINOX_KEK",
            "PATINOX_KEK": "c2VjcmV0",
            "OPENAI_API_KEY": "sk-secret",
        }
    )
    sup = PoolSupervisor(settings=PoolSettings(exec_root=exec_root), template=template)  # no cgroups
    try:
        proc = warm_processes(sup.pool("tn_patinoxtestsecrets0000000", get_plan("free").limits), 1)[0]
        for pid in (template.pid, proc.pid):
            assert pid is not None
            names = {
                v.split(b"=")[0].decode() for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if v
            }
            assert names <= {"PATH", "LANG", "PYTHONPATH"}, names
    finally:
        sup.close()
        template.close()


_TRY_AS = """
import json, os, sys
from patinox.isolation._worker_main import confine
from patinox.isolation.channel import Bind
bind = Bind.model_validate_json(sys.argv[1])
confine(bind, parent_pid=os.getppid())
tried = {}
for what, attempt in (
    ("kek", lambda: open(sys.argv[2], "rb").read()),
    ("database", lambda: open(sys.argv[3], "rb").read()),
    ("deployment_dir", lambda: os.listdir(sys.argv[4])),
    ("become_root", lambda: os.setuid(0)),
    ("leave_its_cgroup", lambda: open(sys.argv[5], "w").write(str(os.getpid()))),
    ("raise_its_memory_limit", lambda: open(sys.argv[6], "w").write("-1")),
):
    try:
        attempt()
        tried[what] = "allowed"
    except PermissionError:
        tried[what] = "denied"
print(json.dumps({"uid": os.getuid(), "tried": tried}))
"""


def test_an_execution_identity_cannot_read_the_kek_the_database_the_deployment_dir_or_write_cgroups(
    supervisor: PoolSupervisor, tmp_path: Path
) -> None:
    """The credentials an execution process confines itself to (its own :func:`confine`,
    run in a fresh interpreter as root, then what an attacker would try)."""
    data_dir = tmp_path / "patinox-test-deployment"
    Runtime.initialise(data_dir).backend.close()  # mode 0700, a KEK file 0600, the database
    kek, db = data_dir / "kek.json", data_dir / "patinox.db"
    assert kek.stat().st_mode & 0o777 == 0o600 and data_dir.stat().st_mode & 0o777 == 0o700
    pool = supervisor.pool("tn_patinoxtestkek00000000000", get_plan("free").limits)
    assert pool.cgroup is not None, "this host gives no writable cgroup controller: run as root (CI does)"
    tenant_procs = pool.cgroup.procs_files()[0]  # the tenant's own group, above the process's
    memory_limit = next(
        f.parent / name
        for f in pool.cgroup.procs_files()
        for name in ("memory.limit_in_bytes", "memory.max")
        if (f.parent / name).exists()
    )
    bind = {"tenant_id": pool.tenant_id, "uid": pool.uid, "gid": pool.gid, "workdir": str(pool.workdir)}
    files = [str(kek), str(db), str(data_dir), str(tenant_procs), str(memory_limit)]
    out = subprocess.run(
        [sys.executable, "-c", _TRY_AS, json.dumps(bind), *files],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        check=True,
    )
    seen = json.loads(out.stdout)
    assert seen["uid"] == pool.uid
    assert seen["tried"] == {
        "kek": "denied",
        "database": "denied",
        "deployment_dir": "denied",
        "become_root": "denied",
        "leave_its_cgroup": "denied",
        "raise_its_memory_limit": "denied",
    }


_PROBE = """
import json, sys
from patinox.isolation import template
import patinox.isolation._worker_main
template._warm_up()
print(json.dumps(sorted(sys.modules)))
"""


def test_the_template_loads_no_storage_control_plane_or_database_code() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=GUARD_S, check=True
    )
    loaded = json.loads(out.stdout)
    assert "pydantic_ai" in loaded and "patinox.isolation._worker_main" in loaded
    forbidden = ("patinox.storage", "patinox.control", "patinox.limits", "patinox.runtime", "patinox.api")
    drivers = ("sqlalchemy", "alembic", "psycopg", "redis", "fastapi", "starlette", "cryptography")
    bad = [m for m in loaded if m.startswith(forbidden) or m.split(".")[0] in drivers]
    assert bad == []


_HOST = """
import json, sys, time
from pathlib import Path
from patinox.isolation import PoolSettings, PoolSupervisor
from patinox.tenancy import get_plan
sup = PoolSupervisor.on_this_host(PoolSettings(exec_root=Path(sys.argv[1])), cgroup_prefix=sys.argv[2])
pool = sup.pool("tn_patinoxtestorphans0000000", get_plan("free").limits)
deadline = time.monotonic() + 60
while len(pool.processes()) < 2 and time.monotonic() < deadline:
    time.sleep(0.02)
print("PIDS", json.dumps([sup.template.pid] + [p.pid for p in pool.processes()]), flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return _status(pid)["State"].startswith(("Z", "X"))
    except FileNotFoundError:
        return True


def test_nothing_outlives_a_host_killed_with_kill_9(exec_root: Path, exec_cgroup_prefix: str) -> None:
    host = subprocess.Popen(
        [sys.executable, "-c", _HOST, str(exec_root), exec_cgroup_prefix], stdout=subprocess.PIPE, text=True
    )
    try:
        assert host.stdout is not None
        line = ""
        while not line.startswith("PIDS "):  # after the supervisor's start-up log line
            line = host.stdout.readline()
            assert line, "the host ended before starting its pool"
        pids = json.loads(line.removeprefix("PIDS "))
        assert len(pids) == 3 and not any(_gone(p) for p in pids)
        os.kill(host.pid, signal.SIGKILL)
        host.wait(GUARD_S)
        deadline = time.monotonic() + GUARD_S
        while not all(_gone(p) for p in pids):
            assert time.monotonic() < deadline, [p for p in pids if not _gone(p)]
            time.sleep(0.05)
    finally:
        host.kill()
        host.wait()
        if host.stdout is not None:
            host.stdout.close()
