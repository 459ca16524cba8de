"""The ``container`` and ``dedicated`` levels' template: one warm template per tenant, inside
the tenant's bubblewrap sandbox.

A ``process`` tenant's execution processes are forked from the host-wide template
(:mod:`patinox.isolation.template`); a ``container`` (or ``dedicated``) tenant gets a
template of its own, started by :class:`SandboxTemplate` as
``bwrap ... -- python -m patinox.isolation.template --fd N --parent 1`` (the sandbox of
:func:`patinox.isolation.sandbox.sandbox_argv`: own PID, IPC, mount, UTS and network
namespaces, system paths read-only, the tenant's directory at ``/work``, no ``/sys``, the
tenant's uid, no capabilities). Its control socket crosses into the sandbox as an inherited
descriptor. Every execution process it forks is therefore inside the sandbox, as the
tenant's uid, from its first instruction.

Inside there is no cgroup file system, so the host places the processes:

- the sandbox starts in the tenant's ``template`` cgroup (the process that executes bwrap
  writes its own pid into that group's ``cgroup.procs`` files before ``exec``, so bwrap,
  its init and the template are counted against the tenant's memory and pids from the
  start);
- each execution process's host pid arrives with its ``Ready`` (``SO_PASSCRED``: the
  kernel translates the sender's pid into the host's PID namespace), and the host moves it
  into its own child cgroup (per-run CPU seconds, peak memory, OOM kills) and raises its
  ``oom_score_adj`` to :data:`EXEC_OOM_SCORE_ADJ` (:func:`place`; raising needs no
  privilege, lowering the template's would need ``CAP_SYS_RESOURCE``), so the OOM killer
  of the tenant's cgroup takes a runaway execution process or ``python`` child (which
  inherits it) before the template every process of the tenant is forked from.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from patinox.isolation.cgroups import ProcessCgroup
from patinox.isolation.sandbox import SandboxSpec, python_layout, sandbox_argv
from patinox.isolation.template import Template

__all__ = ["EXEC_OOM_SCORE_ADJ", "SandboxTemplate", "peer_pid", "place"]

#: ``oom_score_adj`` of a sandboxed execution process and its children: the OOM killer of
#: the tenant's cgroup picks them before the template.
EXEC_OOM_SCORE_ADJ: Final = 500

_UCRED: Final = struct.Struct("3i")


class SandboxTemplate(Template):
    """A tenant's own template, in the tenant's sandbox (module docstring).

    Args:
        spec: the tenant's sandbox (its directory, uid and gid).
        cgroup_procs: the ``cgroup.procs`` files of the tenant's ``template`` group, which
            the sandbox joins before bwrap starts (empty: no cgroups).
        bwrap: the bwrap executable (default :func:`~patinox.isolation.sandbox.find_bwrap`).
        environ, start_timeout_s: as :class:`~patinox.isolation.template.Template`.
    """

    def __init__(
        self,
        spec: SandboxSpec,
        *,
        cgroup_procs: Sequence[Path] = (),
        bwrap: str | None = None,
        environ: Mapping[str, str] | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(python=python_layout().executable, environ=environ, start_timeout_s=start_timeout_s)
        self.spec = spec
        self._cgroup_procs = tuple(str(p) for p in cgroup_procs)
        self._bwrap = bwrap
        # Built now: raises IsolationUnavailable / ConfigurationError before any thread starts.
        self._argv_for = sandbox_argv(spec, ["{python}"], bwrap=bwrap)

    def rebind(self, spec: SandboxSpec, *, cgroup_procs: Sequence[Path] = ()) -> None:
        """A pre-warmed template now bound to a tenant: a restart (after it died) starts
        it with the tenant's ``spec`` and in its cgroup. The running sandbox is moved by
        the caller (its directory adopted, its processes moved to the tenant's cgroup)."""
        sandbox_argv(spec, ["{python}"], bwrap=self._bwrap)  # refused now, not at a restart
        self.spec = spec
        self._cgroup_procs = tuple(str(p) for p in cgroup_procs)

    def _command(self, fd: int) -> list[str]:
        # Inside, the template's parent is bwrap's init (pid 1 of the sandbox's namespace).
        command = [self._python, "-m", "patinox.isolation.template", "--fd", str(fd), "--parent", "1"]
        return sandbox_argv(self.spec, command, bwrap=self._bwrap)

    def _preexec(self) -> Callable[[], None] | None:
        files = self._cgroup_procs

        def join() -> None:  # in the child, between fork and exec: no imports, no locks
            pid = str(os.getpid())
            for path in files:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, pid.encode())
                finally:
                    os.close(fd)

        return join


def peer_pid(sock: socket.socket) -> int:
    """The host pid of the process that sent the next bytes waiting on ``sock`` (they are
    left there: read with ``MSG_PEEK``). ``SO_PASSCRED`` must have been set on ``sock``
    before the peer sent them (it is cleared here). Blocking, bounded by the socket's timeout.

    Raises:
        OSError: nothing could be read, or the kernel gave no credentials.
    """
    try:
        data, ancillary, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(_UCRED.size), socket.MSG_PEEK)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
    if not data:
        raise OSError("the execution process closed its channel before it was ready")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            pid, _, _ = _UCRED.unpack(payload[: _UCRED.size])
            if pid > 0:
                return int(pid)
    raise OSError("the kernel gave no credentials of the execution process")


def place(host_pid: int, cgroup: ProcessCgroup | None) -> None:
    """Move a sandboxed execution process (by its host pid) into its own cgroup and give it
    ``oom_score_adj`` :data:`EXEC_OOM_SCORE_ADJ`. Root only; blocking.

    Raises:
        IsolationFailed: the cgroup refused it.
        OSError: its ``oom_score_adj`` could not be written (it exited).
    """
    if cgroup is not None:
        cgroup.attach(host_pid)
    with open(f"/proc/{host_pid}/oom_score_adj", "w", encoding="ascii") as adj:
        adj.write(str(EXEC_OOM_SCORE_ADJ))
