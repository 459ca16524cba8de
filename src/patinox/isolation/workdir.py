"""The tenants' writable directories and execution identities on this host.

Each tenant gets ``<root>/<tenant_id>``: a tmpfs of ``disk_bytes`` (mounted by the host,
which runs as root) owned by the tenant's execution uid and gid, mode 0700, ``nosuid`` and
``nodev``, with an inode cap that follows its size. A full directory answers ``ENOSPC`` to
the tenant's writes and :meth:`Workdirs.full` to the host (the ``disk_limit`` reason).
Where mounting is not permitted (not root, a container without ``CAP_SYS_ADMIN``) it is a
plain directory with no size cap (:attr:`Workdir.size_bytes` ``None``), said by a
warning and by ``patinox doctor``, never silently.

:class:`ExecIdentities` gives each tenant its own uid and gid from a range, so a tenant's
execution processes can neither signal another tenant's processes nor open its files.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import grp
import json
import os
import pwd
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from patinox.errors import ConfigurationError, IsolationFailed, IsolationUnavailable

__all__ = ["ExecIdentities", "Workdir", "Workdirs", "probe_tmpfs"]

log = structlog.get_logger("patinox.isolation")
T = TypeVar("T")

_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MNT_DETACH = 0x2
_PAGE = os.sysconf("SC_PAGE_SIZE")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(target: Path, flags: int, options: str) -> None:
    """mount(2) of a tmpfs at ``target``. Raises OSError."""
    if _libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", flags, options.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def _umount(target: Path, flags: int = 0) -> None:
    """umount2(2). Raises OSError."""
    if _libc.umount2(os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def _is_mount(path: Path) -> bool:
    """Whether ``path`` is a mount point in this mount namespace (``/proc/self/mountinfo``)."""
    wanted = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split(" ", 5)
            point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == wanted:
                return True
    return False


def probe_tmpfs() -> tuple[bool, str]:
    """Whether this process may mount a size-capped tmpfs (mounts and unmounts a 64 KiB one
    in a temporary directory); returns ``(ok, what was seen)``."""
    probe = Path(tempfile.mkdtemp(prefix="patinox-probe-"))
    try:
        _mount(probe, _MS_NOSUID | _MS_NODEV, "size=64k,mode=0700")
    except OSError as err:
        return False, f"mounting a tmpfs was refused: {err.strerror}"
    else:
        _umount(probe, _MNT_DETACH)
        return True, "size-capped tmpfs mounts work"
    finally:
        probe.rmdir()


def _inodes(size_bytes: int) -> int:
    """Files a directory of ``size_bytes`` may hold: one per 8 KiB, at least 1024 (tmpfs
    inodes cost kernel memory that the size cap does not count)."""
    return max(1024, size_bytes // 8192)


def _pages(size_bytes: int) -> int:
    return -(-size_bytes // _PAGE) * _PAGE


@dataclass(frozen=True)
class Workdir:
    """A tenant's writable directory.

    Attributes:
        path: the directory on the host.
        uid: owner (the tenant's execution uid).
        gid: group (the tenant's execution gid).
        size_bytes: its size cap, bytes (rounded up to pages); ``None`` when it is a plain
            directory with no cap (mounting was not permitted).
    """

    path: Path
    uid: int
    gid: int
    size_bytes: int | None


class Workdirs:
    """The tenants' directories under ``root`` (e.g. ``<data_dir>/exec``, mode 0711: each
    tenant can reach its own directory by name and list none).

    A tenant's uid reaches its directory by path only if every directory above ``root`` is
    searchable by others; where they are not (a 0700 data directory), an execution process
    enters it before dropping root (``chdir``) or gets it bound into its sandbox.

    Raises:
        IsolationFailed: ``root`` could not be made.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            if root.stat().st_uid == os.geteuid():
                root.chmod(0o711)
        except OSError as err:
            raise IsolationFailed.from_os_error("create", root, err) from err

    def path(self, tenant_id: str) -> Path:
        """``<root>/<tenant_id>``.

        Raises:
            ConfigurationError: ``tenant_id`` cannot name a directory.
        """
        if not _NAME.match(tenant_id):
            raise ConfigurationError(f"tenant id {tenant_id!r} cannot name a directory")
        return self.root / tenant_id

    def ensure(self, tenant_id: str, *, uid: int, gid: int, size_bytes: int) -> Workdir:
        """The tenant's directory, ``size_bytes`` big, owned by ``uid:gid``, mode 0700:
        mounted when missing, resized when mounted with another size (a remount; its files
        stay), re-owned when owned by another uid. Idempotent.

        Raises:
            IsolationFailed: mounting failed for another reason than a missing permission,
                the new size is below what the directory holds (``EINVAL``), or something
                else than a tmpfs is mounted there.
        """
        path = self.path(tenant_id)
        try:
            path.mkdir(mode=0o700, exist_ok=True)
        except OSError as err:
            raise IsolationFailed.from_os_error("create", path, err) from err
        options = f"size={size_bytes},nr_inodes={_inodes(size_bytes)}"
        if not _is_mount(path):
            try:
                _mount(path, _MS_NOSUID | _MS_NODEV, f"{options},mode=0700,uid={uid},gid={gid}")
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EACCES):
                    raise IsolationFailed.from_os_error("mount a tmpfs at", path, err) from err
                return self._plain(path, uid, gid, err)
        else:
            stat = os.statvfs(path)
            if stat.f_blocks * stat.f_frsize != _pages(size_bytes):
                try:
                    _mount(path, _MS_REMOUNT | _MS_NOSUID | _MS_NODEV, options)
                except OSError as err:
                    raise IsolationFailed.from_os_error(f"resize to {size_bytes} bytes", path, err) from err
        self._own(path, uid, gid)
        return Workdir(path, uid, gid, _pages(size_bytes))

    def adopt(self, tenant_id: str, spare: str, *, uid: int, gid: int, size_bytes: int) -> Workdir:
        """Make the mounted directory of ``spare`` (a pre-warmed sandbox's, see
        :class:`~patinox.isolation.supervisor.PoolSupervisor`) the tenant's: the same tmpfs is
        bound at ``<root>/<tenant_id>`` (a sandbox that bound it at ``/work`` keeps seeing
        it), ``spare``'s path is unmounted and removed, then the directory is resized to
        ``size_bytes`` and owned by ``uid:gid`` (:meth:`ensure`).

        Raises:
            IsolationFailed: the tenant already has a directory, ``spare`` has no mounted
                one, or a mount, resize or chown failed.
        """
        source, path = self.path(spare), self.path(tenant_id)
        if not _is_mount(source):
            raise IsolationFailed(f"{source} is not a mounted tmpfs", path=str(source), operation="adopt")
        try:
            path.mkdir(mode=0o700)
        except OSError as err:  # FileExistsError too: a tenant's files are never replaced
            raise IsolationFailed.from_os_error("create", path, err) from err
        if _libc.mount(os.fsencode(source), os.fsencode(path), None, _MS_BIND, None) != 0:
            code = ctypes.get_errno()
            path.rmdir()
            raise IsolationFailed.from_os_error(
                "bind a spare directory at", path, OSError(code, os.strerror(code))
            )
        self.remove(spare)
        return self.ensure(tenant_id, uid=uid, gid=gid, size_bytes=size_bytes)

    def _plain(self, path: Path, uid: int, gid: int, err: OSError) -> Workdir:
        log.warning(
            "tenant directory is not size-capped: mounting a tmpfs was refused",
            path=str(path),
            error=err.strerror,
            fix="run as root (CAP_SYS_ADMIN)",
        )
        self._own(path, uid, gid)
        return Workdir(path, uid, gid, None)

    @staticmethod
    def _own(path: Path, uid: int, gid: int) -> None:
        """``path`` (and, when it was someone else's, all below it) owned by uid:gid, 0700."""
        try:
            info = path.lstat()
            if (info.st_uid, info.st_gid) != (uid, gid):
                for top, dirs, files in os.walk(path):
                    for name in (*dirs, *files):
                        os.lchown(os.path.join(top, name), uid, gid)
                os.lchown(path, uid, gid)
            path.chmod(0o700)
        except OSError as err:
            raise IsolationFailed.from_os_error(f"give to {uid}:{gid}", path, err) from err

    def remove(self, tenant_id: str) -> None:
        """Unmount the tenant's directory (lazily when a process still holds it open) and
        remove it with everything in it. Missing is fine.

        Raises:
            IsolationFailed: unmounting or removing failed.
        """
        path = self.path(tenant_id)
        try:
            while _is_mount(path):  # stacked mounts: each one off
                try:
                    _umount(path)
                except OSError as err:
                    if err.errno != errno.EBUSY:
                        raise
                    _umount(path, _MNT_DETACH)
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except OSError as err:
            raise IsolationFailed.from_os_error("remove", path, err) from err

    def used_bytes(self, tenant_id: str) -> int:
        """Bytes the tenant's files take (whole pages on a tmpfs); 0 when it has none."""
        path = self.path(tenant_id)
        try:
            if _is_mount(path):
                stat = os.statvfs(path)
                return (stat.f_blocks - stat.f_bfree) * stat.f_frsize
            total = 0
            for top, dirs, files in os.walk(path):
                for name in (*dirs, *files):
                    total += os.lstat(os.path.join(top, name)).st_blocks * 512
            return total
        except FileNotFoundError:
            return 0
        except OSError as err:
            raise IsolationFailed.from_os_error("measure", path, err) from err

    def full(self, tenant_id: str) -> bool:
        """Whether the tenant's directory has no room left: no free block or no free inode
        (a write there fails with ``ENOSPC``: the ``disk_limit`` reason)."""
        path = self.path(tenant_id)
        try:
            stat = os.statvfs(path)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise IsolationFailed.from_os_error("measure", path, err) from err
        return stat.f_bavail == 0 or stat.f_favail == 0


def _account_exists(uid: int) -> bool:
    """Whether ``uid`` (also used as gid) belongs to a user or group of this system."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


class ExecIdentities:
    """One uid and gid (the same number) per tenant, from ``base`` to ``base + count - 1``,
    skipping ids that belong to a user or group of this system.

    Args:
        base: first id; must be above 0 (never root).
        count: how many ids the range holds.
        registry: a JSON file (under an ``flock``) recording who got which id. Give it
            whenever more than one process on the host runs execution processes, or when
            tenant files outlive this process (its tmpfs directories do): then ids stay
            the same across restarts and two processes never give one id to two tenants.
            Without it the record lives in this process only.

    Raises:
        ConfigurationError: the range includes 0 or passes the largest uid.
    """

    def __init__(self, base: int = 100_000, count: int = 50_000, *, registry: Path | None = None) -> None:
        if base < 1 or count < 1 or base + count > 2**32 - 2:
            raise ConfigurationError(
                f"execution id range {base}..{base + count - 1} is not a valid uid range"
            )
        self.base = base
        self.count = count
        self.registry = registry
        self._given: dict[str, int] = {}
        self._lock = threading.Lock()

    def for_tenant(self, tenant_id: str) -> tuple[int, int]:
        """``(uid, gid)`` of ``tenant_id``: the same on every call, never another tenant's.

        Raises:
            IsolationUnavailable: every id of the range is taken.
            IsolationFailed: the registry could not be read or written.
        """
        with self._lock:
            uid = self._given.get(tenant_id)
            if uid is None:
                uid = self._from_registry(tenant_id) if self.registry else self._next(tenant_id, self._given)
                self._given[tenant_id] = uid
            return uid, uid

    def known(self, tenant_id: str) -> int | None:
        """The uid ``tenant_id`` was given (in this process or, with a registry, any), or
        ``None`` when it has none yet."""
        with self._lock:
            uid = self._given.get(tenant_id)
            if uid is not None or self.registry is None:
                return uid
            return self._update_registry(lambda given: given.get(tenant_id))

    def adopt(self, tenant_id: str, holder: str) -> tuple[int, int]:
        """Give ``tenant_id`` the uid (and gid) of ``holder`` (a pre-warmed sandbox started
        as that uid before any tenant was known), which gives it up: still one uid per
        tenant. Returns ``(uid, gid)``.

        Raises:
            IsolationFailed: ``holder`` has no uid, or ``tenant_id`` already has one (its
                files are owned by it); or the registry could not be written.
        """

        def move(given: dict[str, int]) -> int:
            if tenant_id in given or holder not in given:
                raise IsolationFailed(
                    f"uid of {holder!r} not adoptable by {tenant_id!r}",
                    tenant_id=tenant_id,
                    operation="adopt uid",
                )
            given[tenant_id] = given.pop(holder)
            return given[tenant_id]

        with self._lock:
            if self.registry is None:
                uid = move(self._given)
            else:
                uid = self._update_registry(move, write=True)
                self._given.pop(holder, None)
                self._given[tenant_id] = uid
            return uid, uid

    def release(self, holder: str) -> None:
        """Forget ``holder``'s uid (a pre-warmed sandbox closed unbound): it may be given
        again. Never call it for a tenant whose files may still exist."""
        with self._lock:
            self._given.pop(holder, None)
            if self.registry is not None:
                self._update_registry(lambda given: given.pop(holder, None), write=True)

    def _update_registry(self, change: Callable[[dict[str, int]], T], *, write: bool = False) -> T:
        """``change`` applied to the registry's record under its lock (written back when
        ``write``); the caller holds ``self._lock``."""
        assert self.registry is not None
        lock_path = self.registry.with_name(self.registry.name + ".lock")
        try:
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                given: dict[str, int] = {}
                if self.registry.exists():
                    given = {str(k): int(v) for k, v in json.loads(self.registry.read_text()).items()}
                result = change(given)
                if write:
                    tmp = self.registry.with_name(self.registry.name + ".tmp")
                    tmp.write_text(json.dumps(given, sort_keys=True))
                    os.replace(tmp, self.registry)
                return result
        except OSError as err:
            raise IsolationFailed.from_os_error("record execution ids in", self.registry, err) from err

    def _next(self, tenant_id: str, given: dict[str, int]) -> int:
        taken = set(given.values())
        for uid in range(self.base, self.base + self.count):
            if uid not in taken and not _account_exists(uid):
                given[tenant_id] = uid
                return uid
        raise IsolationUnavailable(
            f"all {self.count} execution ids from {self.base} are taken; widen the range",
            tenant_id=tenant_id,
            mechanism="execution uids",
        )

    def _from_registry(self, tenant_id: str) -> int:
        assert self.registry is not None
        lock_path = self.registry.with_name(self.registry.name + ".lock")
        try:
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                given: dict[str, int] = {}
                if self.registry.exists():
                    given = {str(k): int(v) for k, v in json.loads(self.registry.read_text()).items()}
                if tenant_id in given:
                    return given[tenant_id]
                uid = self._next(tenant_id, given)
                tmp = self.registry.with_name(self.registry.name + ".tmp")
                tmp.write_text(json.dumps(given, sort_keys=True))
                os.replace(tmp, self.registry)
                return uid
        except OSError as err:
            raise IsolationFailed.from_os_error("record execution ids in", self.registry, err) from err
