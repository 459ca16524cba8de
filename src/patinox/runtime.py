"""The composition root: :class:`Settings` and the :class:`Runtime` wired from them.

One place builds the services a process needs (storage, tenant manager, keys, agents,
runs, rate limits, the fair queue) from one :class:`Settings`. It belongs to no interface:
the HTTP API (``patinox serve``), the command line and the queue worker (``patinox
worker``) each build a :class:`Runtime` here, and nothing here imports the HTTP API, so a
queue worker never loads FastAPI.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from patinox.control import (
    AgentService,
    ApiKeys,
    RunService,
    TenantEvent,
    TenantManager,
    WebhookDispatcher,
    WebhookService,
    WebhookSettings,
)
from patinox.control.endpoints import DEFAULT_HOST_QUARANTINE_S, TenantEndpoints
from patinox.control.worker import RunWorker
from patinox.errors import ConfigurationError, NotFound
from patinox.isolation import (
    ExecutorMap,
    NamespaceExecutor,
    PoolSettings,
    PoolSupervisor,
    ProcessExecutor,
    Template,
    process_isolation_available,
)
from patinox.isolation.cgroups import parse_cpus
from patinox.isolation.cores import CoreAllocator
from patinox.isolation.egress import GuardedFetcher
from patinox.isolation.host import detect_host
from patinox.isolation.levels import LevelExecutor
from patinox.limits import (
    AdmissionSettings,
    FairRunQueue,
    FairShareAdmission,
    InlineStorage,
    StorageCalls,
    TokenBudget,
    WindowRateLimiter,
    storage_calls,
    worker_id,
)
from patinox.limits.offload import MAX_THREADS as MAX_STORAGE_THREADS
from patinox.network import EgressSettings
from patinox.storage import SqlBackend, open_backend
from patinox.storage.crypto import FileKeyProvider, key_provider_from_url
from patinox.tenancy import IsolationLevel, ResourceLimits, effective_limits


def _default_exec_root() -> Path:
    """Where tenants' working directories go by default: ``$PATINOX_EXEC_ROOT``, else
    ``<temp dir>/patinox-exec-<uid>`` (outside the deployment directory, which execution
    processes must not be able to enter)."""
    return Path(
        os.environ.get("PATINOX_EXEC_ROOT") or Path(tempfile.gettempdir()) / f"patinox-exec-{os.getuid()}"
    )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Settings of one process of a deployment (API server, queue worker or CLI command).

    Attributes:
        database_url: see :mod:`patinox.storage.engine` (PostgreSQL: the application role).
        kek_url: where the KEK is (``file:///path`` made by ``patinox init``, or
            ``env://VAR``); see :func:`patinox.storage.crypto.key_provider_from_url`.
        owner_url: PostgreSQL owner-role URL for migrations and tenant schemas/databases.
        rate_limit_storage: a ``limits`` storage URI (``memory://``).
        max_body_bytes: largest request body accepted, bytes (larger: 413).
        embedded_workers: most queued runs the API process itself executes at once, as
            many as its fair-share admission allows up to this (0: none; only ``patinox
            worker`` processes execute them).
        admission: the process's fair share of its own capacity
            (:class:`~patinox.limits.FairShareAdmission`); ``enabled=False`` turns it off.
        exec_root: where the working directories of ``process``-level tenants are made
            (``<exec_root>/<tenant_id>``; see :class:`~patinox.isolation.PoolSettings`).
        exec_idle_s: a tenant's execution processes stop after this long without a run,
            seconds (started again by the next run).
        exec_cgroup_prefix: the cgroup (relative to each hierarchy's root) under which the
            tenants' cgroups are made.
        isolation_levels: the levels this deployment offers, among those this host can
            enforce (``namespace`` always); ``None``: every level the host can enforce. A
            tenant asking for another is refused (``422 isolation_unavailable``).
        exec_spares: pre-warmed sandboxed templates kept ready for the next ``container`` or
            ``dedicated`` tenant (as root, on a host that offers ``container``; 0: none, and
            such a tenant's first run starts its sandbox cold, about 2 s here).
        storage_threads: threads that make this process's run-path and authentication
            storage calls off the event loop, shared fairly by tenant, where the database
            is PostgreSQL (:class:`~patinox.limits.FairStorageExecutor`); 0 makes them on
            the loop. SQLite always makes them on the loop. 0 to 64.
        webhooks: how webhooks are sent (the address ranges the operator allows, the CA
            bundle, retries, when an endpoint is disabled); see
            :class:`~patinox.control.WebhookSettings`.
        egress: the operator's egress settings for the ``http_fetch`` tool
            (``PATINOX_EGRESS_*``, :class:`~patinox.network.EgressSettings`): ranges allowed
            or denied beyond each tenant's ``egress_hosts``, schemes, size and time caps.
        base_domain: the deployment's base domain (``PATINOX_BASE_DOMAIN``): each tenant is
            reached at ``<slug>.<base_domain>`` and its custom domains, a tenant key only
            there and on the base host; ``None`` (default): no tenant host names, every host
            answers every tenant (:mod:`patinox.control.endpoints`).
        base_hosts: other names the base host answers on (``PATINOX_BASE_HOSTS``,
            comma-separated, e.g. ``localhost,127.0.0.1``): every tenant's key and the
            ``/admin`` routes are accepted there.
        host_quarantine_s: how long a slug or domain a tenant gave up (or held when deleted)
            is held back from other tenants, seconds (``PATINOX_HOST_QUARANTINE_DAYS``,
            default 30 days).

    Raises:
        ConfigurationError: ``storage_threads`` out of range.
    """

    database_url: str
    kek_url: str
    owner_url: str | None = None
    rate_limit_storage: str = "memory://"
    embedded_workers: int = 256
    max_body_bytes: int = 2 * 1024 * 1024
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    exec_root: Path = field(default_factory=_default_exec_root)
    exec_idle_s: float = 300.0
    exec_cgroup_prefix: str = "patinox"
    exec_spares: int = 1
    isolation_levels: frozenset[IsolationLevel] | None = None
    storage_threads: int = 3
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    egress: EgressSettings = field(default_factory=EgressSettings)
    base_domain: str | None = None
    base_hosts: tuple[str, ...] = ()
    host_quarantine_s: float = DEFAULT_HOST_QUARANTINE_S

    def __post_init__(self) -> None:
        if not 0 <= self.storage_threads <= MAX_STORAGE_THREADS:
            raise ConfigurationError(
                f"storage_threads (PATINOX_STORAGE_THREADS) must be 0 to {MAX_STORAGE_THREADS}, "
                f"not {self.storage_threads}"
            )

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> Settings:
        """Settings of a deployment whose files live in ``data_dir``.

        The database is the SQLite file ``data_dir/patinox.db`` unless
        ``PATINOX_DATABASE_URL`` (and ``PATINOX_OWNER_URL`` for PostgreSQL) say otherwise;
        ``PATINOX_RATE_LIMIT_URL`` picks the rate-limit storage (default ``memory://``);
        the KEK is ``data_dir/kek.json`` unless ``PATINOX_KEK_URL`` says otherwise;
        ``PATINOX_EMBEDDED_WORKERS`` caps how many queued runs the server executes itself
        at once (0: none); ``PATINOX_FAIR_SHARE=off`` turns the fair-share admission off (for
        benchmarks and emergencies); ``PATINOX_EXEC_ROOT``, ``PATINOX_EXEC_IDLE_S``,
        ``PATINOX_CGROUP_PREFIX`` and ``PATINOX_EXEC_SPARES`` set :attr:`exec_root`,
        :attr:`exec_idle_s`, :attr:`exec_cgroup_prefix` and :attr:`exec_spares`;
        ``PATINOX_ISOLATION_LEVELS`` (comma-separated, e.g. ``namespace,process``) limits
        :attr:`isolation_levels`; ``PATINOX_STORAGE_THREADS`` sets :attr:`storage_threads`;
        ``PATINOX_WEBHOOK_ALLOWED_RANGES``, ``PATINOX_WEBHOOK_CA_BUNDLE`` and
        ``PATINOX_WEBHOOK_DISABLE_AFTER`` set :attr:`webhooks`
        (:meth:`~patinox.control.WebhookSettings.from_env`);
        ``PATINOX_EGRESS_*`` set :attr:`egress` (:meth:`EgressSettings.from_env`).

        Raises:
            ConfigurationError: a variable that is not a number where one is needed.
        """
        return cls(
            database_url=os.environ.get("PATINOX_DATABASE_URL")
            or f"sqlite:///{(data_dir / 'patinox.db').resolve()}",
            kek_url=os.environ.get("PATINOX_KEK_URL") or f"file://{(data_dir / 'kek.json').resolve()}",
            owner_url=os.environ.get("PATINOX_OWNER_URL") or None,
            rate_limit_storage=os.environ.get("PATINOX_RATE_LIMIT_URL") or "memory://",
            embedded_workers=int(os.environ.get("PATINOX_EMBEDDED_WORKERS") or 256),
            admission=AdmissionSettings(enabled=_fair_share_enabled(os.environ.get("PATINOX_FAIR_SHARE"))),
            exec_idle_s=float(os.environ.get("PATINOX_EXEC_IDLE_S") or 300.0),
            exec_cgroup_prefix=os.environ.get("PATINOX_CGROUP_PREFIX") or "patinox",
            exec_spares=_count_env("PATINOX_EXEC_SPARES", 1),
            isolation_levels=_levels_env(os.environ.get("PATINOX_ISOLATION_LEVELS")),
            storage_threads=_count_env("PATINOX_STORAGE_THREADS", 3),
            webhooks=WebhookSettings.from_env(),
            egress=EgressSettings.from_env(),
            base_domain=os.environ.get("PATINOX_BASE_DOMAIN") or None,
            base_hosts=tuple(
                h.strip() for h in (os.environ.get("PATINOX_BASE_HOSTS") or "").split(",") if h.strip()
            ),
            host_quarantine_s=_days_env("PATINOX_HOST_QUARANTINE_DAYS", DEFAULT_HOST_QUARANTINE_S),
        )


def _levels_env(value: str | None) -> frozenset[IsolationLevel] | None:
    """``PATINOX_ISOLATION_LEVELS``: unset or empty for every level the host can enforce,
    else a comma-separated list of level names (``namespace`` is always offered).

    Raises:
        ConfigurationError: a name that is not an isolation level.
    """
    names = [n.strip().lower() for n in (value or "").split(",") if n.strip()]
    if not names:
        return None
    known = {level.value: level for level in IsolationLevel}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigurationError(
            f"PATINOX_ISOLATION_LEVELS names unknown levels {unknown}; known: {', '.join(known)}"
        )
    return frozenset(known[n] for n in names) | {IsolationLevel.NAMESPACE}


def _count_env(name: str, default: int) -> int:
    """The whole number >= 0 in environment variable ``name`` (``default`` when unset).

    Raises:
        ConfigurationError: it is set to anything else.
    """
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ConfigurationError(f"{name} must be a whole number >= 0, not {raw!r}")
    return int(raw)


def _days_env(name: str, default_s: float) -> float:
    """The number of days >= 0 in environment variable ``name``, as seconds (``default_s``
    when unset).

    Raises:
        ConfigurationError: it is set to anything else.
    """
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default_s
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if not days >= 0 or days == float("inf"):
        raise ConfigurationError(f"{name} must be a number of days >= 0, not {raw!r}")
    return days * 86_400


def _fair_share_enabled(value: str | None) -> bool:
    """``PATINOX_FAIR_SHARE``: unset, ``on``, ``1``, ``true`` or ``yes`` keep the fair-share
    admission on; ``off``, ``0``, ``false`` or ``no`` turn it off.

    Raises:
        ConfigurationError: any other value.
    """
    if value is None or value.strip().lower() in ("", "on", "1", "true", "yes"):
        return True
    if value.strip().lower() in ("off", "0", "false", "no"):
        return False
    raise ConfigurationError(f"PATINOX_FAIR_SHARE must be 'on' or 'off', not {value!r}")


@dataclass(kw_only=True)
class Runtime:
    """Everything an API server, a queue worker or a CLI command needs; built once at
    start-up from :class:`Settings`."""

    settings: Settings
    backend: SqlBackend
    tenants: TenantManager
    keys: ApiKeys
    agents: AgentService
    runs: RunService
    rate: WindowRateLimiter
    queue: FairRunQueue
    budget: TokenBudget
    executors: ExecutorMap
    process_executor: ProcessExecutor | None = None
    #: Tenants' host names (:mod:`patinox.control.endpoints`); ``None``: endpoints off.
    endpoints: TenantEndpoints | None = None
    #: Where the run path and authentication make their storage calls (see
    #: :attr:`Settings.storage_threads`).
    storage: StorageCalls = field(default_factory=InlineStorage)
    extra: dict[str, object] = field(default_factory=dict)
    #: Webhook endpoints and the outbox settled runs write to (see
    #: :mod:`patinox.control.webhooks`); ``None`` only for a runtime built by hand.
    webhooks: WebhookService | None = None

    @classmethod
    def initialise(cls, data_dir: Path) -> Runtime:
        """Create a deployment directory (mode 0700) with its KEK file (mode 0600) unless
        ``PATINOX_KEK_URL`` points elsewhere, migrate the database, and return the runtime.

        Raises:
            StorageError: the database could not be opened or migrated; a KEK file this
                call created is removed again.
        """
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        settings = Settings.for_data_dir(data_dir)
        kek = Path(settings.kek_url.removeprefix("file://"))
        made_kek = settings.kek_url.startswith("file://") and not kek.exists()
        if made_kek:
            FileKeyProvider.create(kek)
        try:
            rt = cls.build(settings)
        except BaseException:
            # Nothing was encrypted with a KEK made just now: a failed start-up (the
            # database refused) leaves no key file behind.
            if made_kek:
                kek.unlink(missing_ok=True)
            raise
        db = data_dir / "patinox.db"
        if db.exists():
            db.chmod(0o600)
        return rt

    @classmethod
    def build(
        cls, settings: Settings, backend: SqlBackend | None = None, *, template: Template | None = None
    ) -> Runtime:
        """Open storage (migrating it) and wire the services.

        The executor of each isolation level this host can enforce goes in one
        :class:`~patinox.isolation.ExecutorMap`: ``namespace`` always, ``process`` where
        :func:`~patinox.isolation.process_isolation_available` says so (its pool supervisor
        is made at first need: a command that runs nothing at that level starts nothing).

        Args:
            template: a warm template to fork execution processes from, shared with other
                runtimes (tests); default: the supervisor starts its own when first needed.
        """
        backend = backend or open_backend(
            settings.database_url,
            owner_url=settings.owner_url,
            key_provider=key_provider_from_url(settings.kek_url),
        )
        budget = TokenBudget(backend)
        queue = FairRunQueue(backend)
        rate = WindowRateLimiter(settings.rate_limit_storage)
        admission = FairShareAdmission(settings.admission) if settings.admission.enabled else None
        process, executors = _executors(settings, backend, template)
        tenants = TenantManager(backend, supported_isolation=executors.levels, isolation=executors)
        calls = storage_calls(backend.engine.url.drivername, settings.storage_threads)
        runs = RunService(
            backend,
            executors,
            queue=queue,
            budget=budget,
            admission=admission,
            rate=rate,
            calls=calls,
            fetcher=lambda ctx: GuardedFetcher(ctx, settings.egress),
        )
        tenants.subscribe(runs.on_tenant_event)
        tenants.subscribe(runs.on_limits_changed)
        # After the run service's: a suspended or deleted tenant's runs stop first, then its
        # execution processes.
        tenants.subscribe(executors.on_tenant_event)
        # No decrypted key of a suspended or deleted tenant stays in memory.
        forget_on = (TenantEvent.SUSPENDED, TenantEvent.DELETED)
        tenants.subscribe(lambda tid, event: backend.keyring.forget(tid) if event in forget_on else None)
        webhooks = WebhookService(backend, settings.webhooks)
        runs.set_run_events(webhooks.on_settled)
        endpoints = TenantEndpoints(
            backend,
            base_domain=settings.base_domain,
            base_hosts=settings.base_hosts,
            quarantine_s=settings.host_quarantine_s,
        )
        tenants.subscribe(endpoints.on_tenant_event)  # a new tenant gets its slug
        return cls(
            settings=settings,
            backend=backend,
            tenants=tenants,
            keys=ApiKeys(backend),
            agents=AgentService(backend),
            runs=runs,
            rate=rate,
            queue=queue,
            budget=budget,
            executors=executors,
            process_executor=process,
            endpoints=endpoints,
            storage=calls,
            webhooks=webhooks,
        )

    def worker(self, *, concurrency: int = 256, holder: str | None = None) -> RunWorker:
        """A queue worker executing this deployment's queued runs through this runtime.

        Args:
            concurrency: most runs it executes at once.
            holder: its name in queue claims (default ``worker:<host>:<pid>``).

        Returns:
            The :class:`~patinox.control.worker.RunWorker`, not yet running; this
            runtime's run service wakes it when a run is queued in this process. It runs
            a webhook delivery loop beside it (:meth:`webhook_dispatcher`).
        """
        name = holder or worker_id("worker")
        w = RunWorker(
            self.runs,
            self.queue,
            holder=name,
            concurrency=concurrency,
            admission=self.runs.admission,
            webhooks=None if self.webhooks is None else self.webhook_dispatcher(holder=f"{name}:webhooks"),
        )
        self.runs.set_wakeup(w.wakeup)
        if self.process_executor is not None:
            # A process that executes runs supervises execution pools: from now on a
            # ``process`` tenant created here gets its pool at once.
            self.process_executor.hosts_pools = True
        return w

    def webhook_dispatcher(self, *, holder: str | None = None) -> WebhookDispatcher:
        """A webhook delivery loop of this deployment (see
        :class:`~patinox.control.WebhookDispatcher`), not yet running.

        Raises:
            ConfigurationError: this runtime has no webhook service.
        """
        if self.webhooks is None:
            raise ConfigurationError("this runtime was built without webhooks")
        return WebhookDispatcher(self.backend, self.webhooks, holder=holder or worker_id("webhooks"))

    def close(self) -> None:
        """Stop what this runtime started beside storage: every tenant execution pool and
        the template (:meth:`RunService.shutdown` does it too), and the storage threads.
        Idempotent."""
        self.executors.close()
        self.storage.close()


def _executors(
    settings: Settings, backend: SqlBackend, template: Template | None
) -> tuple[ProcessExecutor | None, ExecutorMap]:
    """The execution-process executor (``None`` where this host cannot run it) and the map
    of every level's executor: ``process`` where execution processes work, ``container``
    and ``dedicated`` where :func:`~patinox.isolation.host.detect_host` says the sandbox
    works (and a core can be dedicated), all three served by one executor."""
    namespace = NamespaceExecutor(egress=settings.egress)
    offered = settings.isolation_levels
    available, _ = process_isolation_available()
    if not available or (offered is not None and offered <= {IsolationLevel.NAMESPACE}):
        return None, ExecutorMap({IsolationLevel.NAMESPACE: namespace})
    cores = CoreAllocator(_host_cpus())
    host_levels = _host_levels()

    def tenant_info(tenant_id: str) -> tuple[IsolationLevel, ResourceLimits] | None:
        try:
            row = backend.get_tenant(tenant_id)
        except NotFound:
            return None
        return IsolationLevel(row["isolation_level"]), effective_limits(row["plan"], row["limit_overrides"])

    def supervisor() -> PoolSupervisor:
        return PoolSupervisor.on_this_host(
            PoolSettings(
                exec_root=settings.exec_root,
                idle_s=settings.exec_idle_s,
                spare_templates=settings.exec_spares,
            ),
            template=template,
            tenant_info=tenant_info,
            cgroup_prefix=settings.exec_cgroup_prefix,
            cores=cores,
        )

    def tenant_level(tenant_id: str) -> IsolationLevel | None:
        info = tenant_info(tenant_id)
        return None if info is None else info[0]

    process = ProcessExecutor(supervisor, tenant_level=tenant_level, cores=cores, egress=settings.egress)
    levels: dict[IsolationLevel, LevelExecutor] = {
        IsolationLevel.NAMESPACE: namespace,
        IsolationLevel.PROCESS: process,
    }
    for level in (IsolationLevel.CONTAINER, IsolationLevel.DEDICATED):
        if level in host_levels:
            levels[level] = process
    if offered is not None:
        levels = {level: executor for level, executor in levels.items() if level in offered}
    return process, ExecutorMap(levels)


def _host_cpus() -> tuple[int, ...]:
    """The CPUs tenants' cores come from: the host's online CPUs (not this process's
    affinity, which a runtime with dedicated tenants narrows), else this process's."""
    try:
        return parse_cpus(Path("/sys/devices/system/cpu/online").read_text())
    except (OSError, ValueError):
        return tuple(sorted(os.sched_getaffinity(0)))


@functools.cache
def _host_levels() -> frozenset[IsolationLevel]:
    """The levels this host enforces (probed once per process: it starts sandboxes)."""
    return detect_host().levels()
