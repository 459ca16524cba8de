"""The warm template ("zygote") that forks tenant execution processes, and the host's handle on it.

``python -m patinox.isolation.template --fd N --parent PID`` is started by the host
(:class:`Template`) with a clean environment (no database URL, no KEK, no provider key:
only ``PATH``, ``LANG`` and ``PYTHONPATH`` when the host has one) and no file descriptor
but its control socket ``N`` (a Unix seqpacket socket) and stdio (stdin and stdout on
``/dev/null``, stderr the host's). It imports the agent stack once (1.5-2 s here), runs one
simulated agent run so every lazy import and cache is done, freezes its heap
(:func:`gc.freeze`, so the children's copy-on-write pages stay shared), says
:class:`~patinox.isolation.channel.TemplateReady`, then forks one execution process per
:class:`~patinox.isolation.channel.Spawn` (the new process's socket arrives with it as
``SCM_RIGHTS``) and answers :class:`~patinox.isolation.channel.Spawned` with the child's
pid; later :class:`~patinox.isolation.channel.Exited` with its exit status or signal.

Nothing outlives the host: the template dies with the host thread that started it
(``PR_SET_PDEATHSIG``), every child dies with the template, and the template kills its
children and exits when its control socket closes (the host closed it, or died).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final

from patinox.isolation.channel import (
    ChannelClosed,
    Exited,
    Kill,
    ProtocolError,
    Spawn,
    Spawned,
    TemplateReady,
    decode_template_message,
    encode,
)

__all__ = ["Template", "TemplateUnavailable", "clean_environment", "main"]

_HEADER_BYTES: Final = 4
_PACKET_BYTES: Final = 64 * 1024


class TemplateUnavailable(Exception):
    """The template could not be started, or is gone (the message says why)."""


def clean_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the template and every execution process: ``PATH``, ``LANG`` and
    ``PYTHONPATH`` (when set) from ``environ`` (default ``os.environ``), nothing else: no
    database URL, no KEK, no provider key."""
    environ = os.environ if environ is None else environ
    env = {"PATH": environ.get("PATH") or "/usr/bin:/bin", "LANG": environ.get("LANG") or "C.UTF-8"}
    if environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = environ["PYTHONPATH"]
    return env


def _frame(message: Spawn | Kill | TemplateReady | Spawned | Exited) -> bytes:
    return encode(message)


def _unframe(packet: bytes) -> Spawn | Kill | TemplateReady | Spawned | Exited:
    if len(packet) < _HEADER_BYTES or int.from_bytes(packet[:_HEADER_BYTES], "big") != len(packet) - 4:
        raise ProtocolError("a control packet that is not one whole frame")
    return decode_template_message(packet[_HEADER_BYTES:])


# --- the host's side ----------------------------------------------------------------------


class Template:
    """The host's handle on the template process.

    :meth:`start` returns at once; the template is started by a thread of this object,
    which then reads its messages until it ends. The template dies with that thread
    (``PR_SET_PDEATHSIG``), so the thread lives as long as the template.

    Args:
        python: the interpreter to run (this one by default).
        environ: where :func:`clean_environment` takes ``PATH``/``LANG``/``PYTHONPATH`` from.
        start_timeout_s: how long :meth:`spawn` waits for a template still starting, seconds.
    """

    def __init__(
        self,
        *,
        python: str = sys.executable,
        environ: Mapping[str, str] | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        self._python = python
        self._env = clean_environment(environ)
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._error: str | None = None
        self._closed = False
        self._seq = 0
        self._spawns: dict[int, concurrent.futures.Future[int]] = {}
        self._exits: dict[int, concurrent.futures.Future[int]] = {}
        self.pid: int | None = None
        #: Seconds from starting the interpreter to its ``TemplateReady``.
        self.start_s: float | None = None

    def start(self) -> None:
        """Start the template if it is not running or starting (again, after it died);
        returns at once (after its dead predecessor's thread ended).

        Raises:
            TemplateUnavailable: it was closed.
        """
        with self._lock:
            if self._closed:
                raise TemplateUnavailable("the template was closed")
            previous = self._thread
            if previous is not None and previous.is_alive() and self._error is None:
                return
        if previous is not None and previous is not threading.current_thread():
            previous.join(10)  # a dead template's thread, finishing
        with self._lock:
            if self._thread is not previous or self._closed:
                return  # another caller started it meanwhile, or it was closed
            self._ready.clear()
            self._error = None
            self._thread = threading.Thread(target=self._run, name="patinox-template", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the template is up and answering."""
        return self._ready.is_set() and self._error is None and not self._closed

    @property
    def launched(self) -> bool:
        """Whether its process was started (it may still be warming up)."""
        return self._proc is not None

    @property
    def failed(self) -> bool:
        """Whether it could not start, or is gone (a :meth:`start` tries again)."""
        return self._error is not None or self._closed

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Start the template if needed and wait until it forks on request.

        Raises:
            TemplateUnavailable: it failed to start, or did not within ``timeout_s``
                (default ``start_timeout_s``).
        """
        self.start()
        if not self._ready.wait(self._start_timeout_s if timeout_s is None else timeout_s):
            raise TemplateUnavailable("the template did not start in time")
        if self._error is not None:
            raise TemplateUnavailable(self._error)

    def spawn(
        self, sock: socket.socket, *, timeout_s: float = 60.0
    ) -> tuple[int, concurrent.futures.Future[int]]:
        """Fork an execution process serving ``sock`` (its end of a socket pair; the caller
        closes its copy afterwards). Blocking; callable from any thread.

        Returns:
            The child's pid and a future of its exit status (``Popen.returncode`` style:
            exit code, or ``-signal``), set when the template reaps it (or ``-9`` when the
            template itself is gone).

        Raises:
            TemplateUnavailable: no template, or it failed to fork.
        """
        self.wait_ready()
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._lock:
            control = self._sock
            if control is None or self._error is not None:
                raise TemplateUnavailable(self._error or "the template is not running")
            self._seq += 1
            seq = self._seq
            self._spawns[seq] = future
            try:
                socket.send_fds(control, [_frame(Spawn(seq=seq))], [sock.fileno()])
            except OSError as err:
                del self._spawns[seq]
                raise TemplateUnavailable(f"the template is gone: {err}") from err
        try:
            pid = future.result(timeout_s)
        except concurrent.futures.TimeoutError as err:
            raise TemplateUnavailable("the template did not fork in time") from err
        except TemplateUnavailable:
            raise
        with self._lock:
            exit_future = self._exits.get(pid)
        if exit_future is None:  # it exited already, or the template died (and it with it)
            exit_future = concurrent.futures.Future()
            exit_future.set_result(-signal.SIGKILL)
        return pid, exit_future

    def kill(self, pid: int) -> None:
        """SIGKILL the template's child ``pid`` (nothing if it is not a live child)."""
        with self._lock:
            control = self._sock
            if control is None:
                return
            with contextlib.suppress(OSError):
                control.send(_frame(Kill(pid=pid)))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the template: it kills its children and exits. Idempotent."""
        with self._lock:
            self._closed = True
            control, self._sock = self._sock, None
            proc = self._proc
            thread = self._thread
        if control is not None:
            with contextlib.suppress(OSError):
                control.shutdown(socket.SHUT_RDWR)
            control.close()
        if proc is not None:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    # -- the thread ---------------------------------------------------------------------

    def _command(self, fd: int) -> list[str]:
        """The template's command line, its control socket being ``fd`` (a subclass wraps
        it, e.g. in a sandbox: :class:`patinox.isolation.container.SandboxTemplate`)."""
        return [
            self._python,
            "-m",
            "patinox.isolation.template",
            "--fd",
            str(fd),
            "--parent",
            str(os.getpid()),
        ]

    def _preexec(self) -> Callable[[], None] | None:
        """What the template's process runs before it executes its command (none here)."""
        return None

    def _run(self) -> None:
        """Start the template, then read its messages until it ends (this thread is its
        ``PR_SET_PDEATHSIG`` parent)."""
        started = time.perf_counter()
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                self._command(child.fileno()),
                env=self._env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(child.fileno(),),
                close_fds=True,
                start_new_session=True,
                preexec_fn=self._preexec(),
            )
        except (OSError, subprocess.SubprocessError) as err:
            host.close()
            child.close()
            self._fail(f"the template could not be started: {err}")
            return
        child.close()
        with self._lock:
            self._proc = proc
            if self._closed:
                proc.kill()
            else:
                self._sock = host
        try:
            self._read(host, started)
        finally:
            self._fail(f"the template exited (status {proc.poll()})")
            host.close()
            proc.wait()

    def _read(self, host: socket.socket, started: float) -> None:
        while True:
            try:
                packet = host.recv(_PACKET_BYTES)
            except OSError:
                return
            if not packet:
                return
            try:
                message = _unframe(packet)
            except ProtocolError:
                return
            if isinstance(message, TemplateReady):
                self.pid = message.pid
                self.start_s = time.perf_counter() - started
                self._ready.set()
            elif isinstance(message, Spawned):
                self._spawned(message)
            elif isinstance(message, Exited):
                with self._lock:
                    exit_future = self._exits.pop(message.pid, None)
                if exit_future is not None and not exit_future.done():
                    exit_future.set_result(message.status)

    def _spawned(self, message: Spawned) -> None:
        with self._lock:
            future = self._spawns.pop(message.seq, None)
            if message.pid is not None:
                # Registered before anyone can hear of the pid: its Exited comes after this.
                self._exits[message.pid] = concurrent.futures.Future()
        if future is None or future.done():
            return
        if message.pid is None:
            future.set_exception(TemplateUnavailable(f"the template could not fork: {message.error}"))
        else:
            future.set_result(message.pid)

    def _fail(self, error: str) -> None:
        """The template is gone: fail what waits on it; its children died with it."""
        with self._lock:
            self._error = self._error or error
            self._sock = None
            spawns, self._spawns = self._spawns, {}
            exits, self._exits = self._exits, {}
        self._ready.set()
        for future in spawns.values():
            if not future.done():
                future.set_exception(TemplateUnavailable(error))
        for exit_future in exits.values():
            if not exit_future.done():
                exit_future.set_result(-signal.SIGKILL)


# --- the template's side ------------------------------------------------------------------


def _warm_up() -> None:
    """One simulated run through every built-in tool, so lazy imports, schemas and caches
    are done before any fork (a child then starts warm, and never needs to read a module
    file after it dropped its privileges)."""
    import asyncio

    from patinox.agents import BUILTIN_TOOLS, AgentDefinition, RunLimits, run_agent

    class _Memory:
        def __init__(self) -> None:
            self.values: dict[str, str] = {}

        def memory_get(self, key: str) -> str | None:
            return self.values.get(key)

        def memory_put(self, key: str, value: str) -> None:
            self.values[key] = value

        def memory_list(self, prefix: str = "", limit: int = 100) -> list[str]:
            return sorted(k for k in self.values if k.startswith(prefix))[:limit]

    prompt = "\n".join(
        [
            '/call memory_put {"key": "k", "value": "v"}',
            '/call memory_get {"key": "k"}',
            '/call memory_list {"prefix": ""}',
            '/call calculator {"expression": "2*(3+4)"}',
            "/call current_time {}",
        ]
    )
    definition = AgentDefinition(
        name="warm-up", instructions="warm up", model="simulated:instant", tools=tuple(sorted(BUILTIN_TOOLS))
    )
    limits = RunLimits(max_output_tokens=64, max_tool_calls=8, timeout_s=60)
    asyncio.run(run_agent(definition, prompt, output_tokens=8, limits=limits, memory=_Memory()))


class _Zygote:
    """The template's loop: fork on request, report exits."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)

    def send(self, message: Spawned | Exited | TemplateReady) -> None:
        self.control.send(_frame(message))

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.control:
                    if not self._request():
                        return
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
            self._reap()

    def _request(self) -> bool:
        """Serve one request; False once the host closed the control socket."""
        try:
            packet, fds, _, _ = socket.recv_fds(self.control, _PACKET_BYTES, 4)
        except OSError:
            return False
        if not packet:
            for fd in fds:
                os.close(fd)
            return False
        try:
            message = _unframe(packet)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            return True
        if isinstance(message, Spawn):
            self._spawn(message, fds)
        elif isinstance(message, Kill) and message.pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(message.pid, signal.SIGKILL)
        for fd in fds:
            os.close(fd)
        return True

    def _spawn(self, message: Spawn, fds: list[int]) -> None:
        if len(fds) != 1:
            self.send(Spawned(seq=message.seq, error=f"expected one socket, got {len(fds)}"))
            return
        template_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as err:
            self.send(Spawned(seq=message.seq, error=str(err)))
            return
        if pid == 0:  # the execution process
            self._become_child(fds[0], template_pid)
        self.children.add(pid)
        self.send(Spawned(seq=message.seq, pid=pid))

    def _become_child(self, fd: int, template_pid: int) -> None:
        """In the fresh child: drop everything of the template, keep only ``fd`` (as 3) and
        stdio, then serve it (never returns)."""
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            from patinox.isolation._worker_main import die_with_parent, serve

            die_with_parent(template_pid)
            os.dup2(fd, 3)
            self.control.detach()
            os.closerange(4, 1 << 20)
        except BaseException:
            os._exit(4)
        serve(3, parent_pid=template_pid)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            with contextlib.suppress(OSError):
                self.send(Exited(pid=pid, status=code))

    def stop(self) -> None:
        """Kill every child and reap them."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()


def main(argv: list[str] | None = None) -> int:
    """The template process (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m patinox.isolation.template")
    parser.add_argument("--fd", type=int, required=True, help="the control socket (seqpacket)")
    parser.add_argument("--parent", type=int, required=True, help="the host's pid")
    args = parser.parse_args(argv)
    from patinox.isolation._worker_main import die_with_parent

    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when it stops
    control = socket.socket(fileno=args.fd)
    _warm_up()
    gc.collect()
    gc.freeze()
    zygote = _Zygote(control)
    try:
        zygote.send(TemplateReady(pid=os.getpid()))
        zygote.serve()
    except (ChannelClosed, OSError):
        pass
    finally:
        zygote.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
