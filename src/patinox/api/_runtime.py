"""The objects one server process holds, wired from settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from patinox.control import AgentService, ApiKeys, RunService, TenantManager
from patinox.isolation import NamespaceExecutor
from patinox.limits import ConcurrencyLimiter, TokenBudget, WindowRateLimiter
from patinox.storage import SqlBackend, open_backend


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Server settings.

    Attributes:
        database_url: see :mod:`patinox.storage.engine`.
        rate_limit_storage: a ``limits`` storage URI (``memory://``).
        max_body_bytes: largest request body accepted, bytes (larger: 413).
    """

    database_url: str
    rate_limit_storage: str = "memory://"
    max_body_bytes: int = 2 * 1024 * 1024

    @classmethod
    def for_data_dir(cls, data_dir: Path, **kw: object) -> Settings:
        """Settings of an embedded deployment in ``data_dir`` (SQLite file ``patinox.db``)."""
        return cls(database_url=f"sqlite:///{(data_dir / 'patinox.db').resolve()}", **kw)  # type: ignore[arg-type]


@dataclass(kw_only=True)
class Runtime:
    """Everything a server process needs; built once at start-up."""

    settings: Settings
    backend: SqlBackend
    tenants: TenantManager
    keys: ApiKeys
    agents: AgentService
    runs: RunService
    rate: WindowRateLimiter
    concurrency: ConcurrencyLimiter
    budget: TokenBudget
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, backend: SqlBackend | None = None) -> Runtime:
        """Open storage (migrating it) and wire the services."""
        backend = backend or open_backend(settings.database_url)
        concurrency = ConcurrencyLimiter()
        budget = TokenBudget(lambda tid, since: backend.acting_on(tid).tokens_used_since(since))
        rate = WindowRateLimiter(settings.rate_limit_storage)
        tenants = TenantManager(backend)
        tenants.subscribe(budget.forget)
        return cls(
            settings=settings,
            backend=backend,
            tenants=tenants,
            keys=ApiKeys(backend),
            agents=AgentService(backend),
            runs=RunService(backend, NamespaceExecutor(), concurrency=concurrency, budget=budget),
            rate=rate,
            concurrency=concurrency,
            budget=budget,
        )
