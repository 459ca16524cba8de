"""The change epoch under faults: database URLs in URI form, a truncated, deleted or
replaced epoch file, a backend used after (or while) it is closed.

Each failure here let a process keep accepting a revoked key (stale cache) or killed it
(SIGBUS from a mapped file, ValueError from a closed map)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from patinox.control import TenantSpec
from patinox.errors import AuthenticationFailed
from patinox.runtime import Runtime, Settings
from patinox.storage._cache import MISS, ChangeEpoch, TenantCache, epoch_for_url
from patinox.tenancy import TenantContext


def _tenant_key(rt: Runtime, name: str) -> tuple[str, str, str]:
    tenant = rt.tenants.create(TenantSpec(name=name, plan="pro"), actor="test")
    issued = rt.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="test")
    return tenant.id, str(issued.record["id"]), issued.secret


def _warm(rt: Runtime, secret: str) -> None:
    assert isinstance(rt.keys.authenticate(secret), TenantContext)
    assert isinstance(rt.keys.authenticate(secret), TenantContext)  # served from the cache


@pytest.fixture
def file_uri_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    data = tmp_path / "d"
    data.mkdir()
    monkeypatch.setenv("PATINOX_DATABASE_URL", f"sqlite:///file:{data / 'patinox.db'}?uri=true")
    yield data


def test_a_file_uri_database_on_disk_shares_its_epoch_between_processes(file_uri_env: Path) -> None:
    # sqlite:///file:/path/db?uri=true is an ordinary database file that other processes
    # open too; it used to get a counter private to the process, so another process's
    # revocation stayed unseen for the cache's whole TTL.
    _revocation_is_seen(Runtime.initialise(file_uri_env), file_uri_env, closed=None)


def test_file_uris_map_to_the_file_beside_the_database(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    for url in (
        f"sqlite:///file:{db}?uri=true",
        f"sqlite:///file:{db}?mode=rwc&uri=true",
        f"sqlite:///file://{db}?uri=true",
        f"sqlite:///file://localhost{db}?uri=true",
    ):
        epoch = epoch_for_url(url)
        assert epoch is not None and epoch.path == Path(f"{db}.epoch"), url
        epoch.close()


def test_engines_sharing_one_in_memory_database_share_one_epoch() -> None:
    # file:NAME?mode=memory&cache=shared is one database for every engine of the process.
    url = "sqlite:///file:hunt3mem?mode=memory&cache=shared&uri=true"
    a, b = TenantCache(epoch_for_url(url)), TenantCache(epoch_for_url(url))
    seen = b.epoch()
    b.put("tn_a", "k", 1, seen)
    a.changed("tn_a")
    b.epoch()
    assert b.get("k") is MISS and b.tenant_size("tn_a") == 0


_SCRIPT = """
import os, sys
from pathlib import Path
from patinox.runtime import Runtime
from patinox.control import TenantSpec
from patinox.errors import AuthenticationFailed
data = Path(sys.argv[1])
rt = Runtime.initialise(data)
t = rt.tenants.create(TenantSpec(name="acme", plan="pro"), actor="t")
k = rt.keys.create(tenant_id=t.id, name="k", scopes=None, actor="t")
rt.keys.authenticate(k.secret)
os.truncate(data / "patinox.db.epoch", 0)
rt.keys.authenticate(k.secret)
rt.keys.revoke(k.record["id"], tenant_id=t.id, actor="t")
try:
    rt.keys.authenticate(k.secret)
except AuthenticationFailed:
    print("refused")
"""


def test_a_truncated_epoch_file_does_not_kill_the_process(tmp_path: Path) -> None:
    # A mapped file truncated under the map raises SIGBUS on the next read: the whole
    # server died on the next request.
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "d")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "refused"


def _delete(epoch: Path) -> None:
    os.unlink(epoch)


def _replace(epoch: Path) -> None:
    fresh = epoch.with_name("fresh")
    fresh.write_bytes(epoch.read_bytes())
    os.replace(fresh, epoch)  # e.g. a restore or sync tool writing files by rename


@pytest.mark.parametrize("disturb", [_delete, _replace], ids=["deleted", "replaced"])
def test_an_epoch_file_deleted_or_replaced_while_serving_is_followed(
    tmp_path: Path, disturb: Callable[[Path], None]
) -> None:
    # The server kept the old file's inode; a process started afterwards used the new
    # file: their changes no longer reached each other.
    server = Runtime.initialise(tmp_path / "d")
    try:
        tenant_id, key_id, secret = _tenant_key(server, "acme")
        _warm(server, secret)
        disturb(tmp_path / "d" / "patinox.db.epoch")
        other = Runtime.build(Settings.for_data_dir(tmp_path / "d"))  # started afterwards
        try:
            other.keys.revoke(key_id, tenant_id=tenant_id, actor="test")
            with pytest.raises(AuthenticationFailed):
                server.keys.authenticate(secret)
        finally:
            other.backend.close()
    finally:
        server.backend.close()


@pytest.mark.parametrize("closed", ["checker", "writer"])
def test_a_closed_backend_keeps_sharing_changes(tmp_path: Path, closed: str) -> None:
    # close() released the epoch's file and the counter silently became private to the
    # process, while the backend itself (its engine re-connects) kept working: a key
    # revoked by the other process stayed accepted by the closed one ("checker"), and a
    # revocation made through the closed one never reached the other ("writer").
    _revocation_is_seen(Runtime.initialise(tmp_path / "d"), tmp_path / "d", closed=closed)


def _revocation_is_seen(server: Runtime, data: Path, *, closed: str | None) -> None:
    """A key revoked through one of two runtimes on ``data`` is refused by the other at
    once; ``closed`` names the one whose backend was closed first ("checker"/"writer")."""
    other = Runtime.build(Settings.for_data_dir(data))
    checker, writer = (other, server) if closed == "writer" else (server, other)
    try:
        tenant_id, key_id, secret = _tenant_key(server, "acme")
        if closed is not None:
            server.backend.close()
        _warm(checker, secret)
        writer.keys.revoke(key_id, tenant_id=tenant_id, actor="test")
        with pytest.raises(AuthenticationFailed):
            checker.keys.authenticate(secret)
    finally:
        server.backend.close()
        other.backend.close()


def test_closing_while_other_threads_look_up_raises_nothing(tmp_path: Path) -> None:
    # read() checked the map, then used it: a close() in between raised ValueError
    # ("mmap closed or invalid") or TypeError into a request being served.
    errors: list[BaseException] = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for i in range(500):
            cache = TenantCache(ChangeEpoch(tmp_path / f"e{i}"))
            stop = threading.Event()

            def hammer(cache: TenantCache = cache, stop: threading.Event = stop) -> None:
                try:
                    while not stop.is_set():
                        cache.put("tn_a", "k", 1, cache.epoch())
                        cache.get("k")
                        cache.changed("tn_a")
                except BaseException as err:  # collected, asserted below
                    errors.append(err)

            threads = [threading.Thread(target=hammer) for _ in range(3)]
            for t in threads:
                t.start()
            cache.close()
            stop.set()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []


def test_forked_processes_never_lose_an_increment(tmp_path: Path) -> None:
    # A server forking workers after start-up (gunicorn --preload) left every worker the
    # parent's descriptor: flock on one open file description excludes nobody, so
    # concurrent bumps overwrote each other and the epoch could even go back to a value
    # a process had already seen (its stale entries then looked current).
    epoch = ChangeEpoch(tmp_path / "e")
    n, children = 2000, []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            code = 0
            try:
                for _ in range(n):
                    epoch.bump()
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    for _ in range(n):
        epoch.bump()
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    assert ChangeEpoch(tmp_path / "e").read() == 4 * n
