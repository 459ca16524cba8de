"""Isolation levels, tenant states, resource limits and plans.

Plan figures are the defaults of a deployment; each tenant may override any limit.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from enum import StrEnum
from typing import Annotated, Any

import idna
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from patinox.errors import InvalidRequest, ModelNotAllowed


class IsolationLevel(StrEnum):
    """Where a tenant's runs execute (PRODUCT.md, capability 5)."""

    NAMESPACE = "namespace"
    """In the shared server process; isolation is logical (context + data layer)."""
    PROCESS = "process"
    """In the tenant's own worker processes, with OS limits."""
    CONTAINER = "container"
    """In a Linux-namespace sandbox (bubblewrap) or a pod per tenant namespace."""
    DEDICATED = "dedicated"
    """On exclusive CPU cores or a dedicated node pool."""


class StorageModel(StrEnum):
    """Where a tenant's rows live (PRODUCT.md: pool / bridge / silo)."""

    POOL = "pool"
    """Shared tables; every row carries the tenant id; PostgreSQL adds row-level security."""
    BRIDGE = "bridge"
    """A schema per tenant in the shared database (PostgreSQL only)."""
    SILO = "silo"
    """A database per tenant (a file per tenant on SQLite)."""


class TenantState(StrEnum):
    """Lifecycle states. Allowed moves: active<->suspended, active|suspended->deleting->deleted."""

    ACTIVE = "active"
    SUSPENDED = "suspended"
    DELETING = "deleting"
    DELETED = "deleted"


#: A pattern of model ids: letters, digits and ``. _ - : / = ,``, and ``*`` for any run of
#: characters (``openai:*``, ``simulated*``, ``*``).
ModelPattern = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9*][A-Za-z0-9._:/=,*-]*$")
]
#: A model id (see :mod:`patinox.agents.models` for the families).
ModelId = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/=,-]*$")
]


def model_allowed(model_id: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether ``model_id`` matches one of ``patterns``, where ``*`` matches any run of
    characters (``openai:*`` matches ``openai:gpt-4o``; ``simulated*`` matches ``simulated``
    and ``simulated:instant``) and everything else matches itself, case included."""
    return any(_pattern(p).fullmatch(model_id) for p in patterns)


@functools.lru_cache(maxsize=1024)
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def check_model_allowed(model_id: str, limits: ResourceLimits, *, tenant_id: str | None = None) -> None:
    """Refuse ``model_id`` when it is outside ``limits.allowed_models``.

    Raises:
        ModelNotAllowed: 403 ``model_not_allowed``; fields ``model``, ``allowed_models``.
    """
    if not model_allowed(model_id, limits.allowed_models):
        raise ModelNotAllowed(
            f"model {model_id!r} is not allowed for this tenant; allowed: {', '.join(limits.allowed_models)}",
            model=model_id,
            allowed_models=list(limits.allowed_models),
            tenant_id=tenant_id,
        )


class ResourceLimits(BaseModel):
    """Effective per-tenant limits, all enforced in the ``namespace`` level.

    Units are in each field's name: per minute, runs, tokens, tool calls, seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    requests_per_minute: int = Field(ge=1, description="API requests per rolling minute")
    key_requests_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="API requests per rolling minute, per API key (None: requests_per_minute)",
    )
    agent_runs_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="runs started per rolling minute, per agent (None: requests_per_minute)",
    )
    max_concurrent_runs: int = Field(ge=1, description="runs in flight at once")
    tokens_per_day: int = Field(ge=1, description="model tokens (in + out) per UTC day")
    runs_per_day: int = Field(ge=1, description="runs started per UTC day")
    memory_bytes: int = Field(ge=1, description="agent memory stored (sealed values + keys), bytes")
    max_agents: int = Field(ge=1, description="agents the tenant may have defined at once")
    max_output_tokens_per_run: int = Field(ge=1, description="output tokens one run may ask for")
    max_tool_calls_per_run: int = Field(ge=0, description="tool calls within one run")
    run_timeout_s: float = Field(gt=0, description="wall time of one run, seconds")
    # Execution limits: enforced by the operating system at the ``process``, ``container``
    # and ``dedicated`` levels (cgroups where the host allows it, rlimits otherwise); the
    # ``namespace`` level shares one process and cannot enforce them (README, isolation).
    exec_memory_bytes: int = Field(
        default=512 * 2**20,
        ge=16 * 2**20,
        description="memory of all the tenant's execution processes together, bytes",
    )
    cpu_weight: int = Field(
        default=100, ge=1, le=10_000, description="CPU weight (cgroup v2 scale, 100 = default)"
    )
    cpu_quota_cores: float | None = Field(
        default=None, gt=0, description="CPU time per wall second, cores (None: no quota)"
    )
    cpu_seconds_per_run: float = Field(default=30, gt=0, description="CPU seconds one run may use")
    max_processes: int = Field(
        default=64, ge=4, description="processes and threads in the tenant's execution cgroup"
    )
    max_open_files: int = Field(default=256, ge=16, description="open files per execution process")
    disk_bytes: int = Field(
        default=64 * 2**20, ge=2**20, description="the tenant's writable directory, bytes"
    )
    execution_processes: int = Field(
        default=2, ge=1, description="warm execution processes of the tenant per host"
    )
    dedicated_cores: int = Field(default=1, ge=1, description="CPU cores a dedicated tenant gets for itself")
    code_timeout_s: float = Field(default=10, gt=0, description="wall time of one python tool call, seconds")
    code_output_bytes: int = Field(
        default=64 * 2**10, ge=1024, description="stdout + stderr kept from one python tool call, bytes"
    )
    # Model selection: which model ids the tenant's agents and runs may use (patterns, see
    # model_allowed) and the model of an agent defined without one.
    allowed_models: tuple[ModelPattern, ...] = Field(
        default=("*",),
        min_length=1,
        max_length=64,
        description="model ids the tenant may use: patterns where * matches any characters",
    )
    default_model: ModelId = Field(default="simulated", description="model of an agent defined without one")
    # Configuration isolation: which tools the tenant's agents may name, and which hosts the
    # http_fetch tool may reach (the deployment's address guard applies on top).
    allowed_tools: tuple[str, ...] | None = Field(
        default=None, description="tools the tenant's agents may name (None: every installed tool)"
    )
    egress_hosts: tuple[str, ...] = Field(
        default=(),
        description="hosts the http_fetch tool may reach: api.example.com, *.example.com (empty: none)",
    )

    @field_validator("allowed_tools")
    @classmethod
    def _check_tools(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _tool_names(value)

    @field_validator("egress_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _egress_hosts(value)

    @property
    def per_key_rpm(self) -> int:
        """Requests per minute one API key may make."""
        return self.key_requests_per_minute or self.requests_per_minute

    @property
    def per_agent_rpm(self) -> int:
        """Runs per minute one agent may start."""
        return self.agent_runs_per_minute or self.requests_per_minute


#: Largest per-minute rate a limit may be set to.
MAX_RATE = 10**9
#: Most names an allow-list setting (``allowed_tools``, ``egress_hosts``) may hold.
MAX_LISTED = 256

_TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _tool_names(names: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """``allowed_tools`` checked: each a tool name (a letter or ``_``, then letters, digits,
    ``_``; at most 64), no name twice; in the given order."""
    if names is None:
        return None
    for name in names:
        if not _TOOL_NAME.match(name):
            raise ValueError(f"not a tool name: {name!r}")
    if len(set(names)) != len(names):
        raise ValueError("a tool is listed twice")
    return names


def _egress_hosts(patterns: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """``egress_hosts`` checked and normalised: each a host name, ``*.`` + a host name, or
    an IP address; names IDNA-encoded (UTS 46) and lower case, without a final dot, so
    ``Bücher.Example`` is stored as ``xn--bcher-kva.example`` and compared as the address
    guard compares hosts."""
    if patterns is None:
        return None
    out: list[str] = []
    for pattern in patterns:
        out.append(egress_pattern(pattern))
    return tuple(dict.fromkeys(out))


def egress_pattern(pattern: str) -> str:
    """One egress allow-list entry, normalised (see :func:`_egress_hosts`).

    Raises:
        ValueError: not a host name, ``*.name`` pattern or IP address.
    """
    wild = pattern.startswith("*.")
    name = (pattern[2:] if wild else pattern).strip().rstrip(".")
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        address = None
    if address is not None:
        if wild:
            raise ValueError(f"an address cannot take '*.': {pattern!r}")
        return str(address)
    try:
        encoded = idna.encode(name, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError) as err:
        raise ValueError(f"not a host name: {pattern!r} ({err})") from None
    if not encoded or ("." not in encoded and not wild and encoded != "localhost"):
        # A single label other than localhost names nothing outside this host's search path.
        raise ValueError(f"not a fully qualified host name: {pattern!r}")
    return ("*." if wild else "") + encoded


class LimitOverrides(BaseModel):
    """Per-tenant overrides of plan limits; ``None`` keeps the plan's value."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # Upper bounds keep every value storable (queue and ledger columns) and meaningful;
    # past them an override is refused with 422 rather than failing every run later.
    requests_per_minute: int | None = Field(default=None, ge=1, le=MAX_RATE)
    key_requests_per_minute: int | None = Field(default=None, ge=1, le=MAX_RATE)
    agent_runs_per_minute: int | None = Field(default=None, ge=1, le=MAX_RATE)
    max_concurrent_runs: int | None = Field(default=None, ge=1, le=1_000_000)
    tokens_per_day: int | None = Field(default=None, ge=1, le=10**15)
    runs_per_day: int | None = Field(default=None, ge=1, le=10**12)
    memory_bytes: int | None = Field(default=None, ge=1, le=2**50, description="bytes (at most 1 PiB)")
    max_agents: int | None = Field(default=None, ge=1, le=1_000_000)
    max_output_tokens_per_run: int | None = Field(default=None, ge=1, le=10**7)
    max_tool_calls_per_run: int | None = Field(default=None, ge=0, le=10**4)
    run_timeout_s: float | None = Field(
        default=None, gt=0, le=30 * 86_400, description="seconds (<= 30 days)"
    )
    exec_memory_bytes: int | None = Field(default=None, ge=16 * 2**20, le=2**50)
    cpu_weight: int | None = Field(default=None, ge=1, le=10_000)
    cpu_quota_cores: float | None = Field(default=None, gt=0, le=4_096)
    cpu_seconds_per_run: float | None = Field(default=None, gt=0, le=30 * 86_400)
    max_processes: int | None = Field(default=None, ge=4, le=4_194_304)
    max_open_files: int | None = Field(default=None, ge=16, le=1_048_576)
    disk_bytes: int | None = Field(default=None, ge=2**20, le=2**50)
    execution_processes: int | None = Field(default=None, ge=1, le=4_096)
    dedicated_cores: int | None = Field(default=None, ge=1, le=4_096)
    code_timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    code_output_bytes: int | None = Field(default=None, ge=1024, le=2**30)
    allowed_models: tuple[ModelPattern, ...] | None = Field(default=None, min_length=1, max_length=64)
    default_model: ModelId | None = None
    allowed_tools: tuple[str, ...] | None = Field(default=None, max_length=MAX_LISTED)
    egress_hosts: tuple[str, ...] | None = Field(default=None, max_length=MAX_LISTED)

    @field_validator("allowed_tools")
    @classmethod
    def _check_tools(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _tool_names(value)

    @field_validator("egress_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _egress_hosts(value)

    @model_validator(mode="after")
    def _default_model_is_allowed(self) -> LimitOverrides:
        if (
            self.default_model is not None
            and self.allowed_models is not None
            and not model_allowed(self.default_model, self.allowed_models)
        ):
            raise ValueError("default_model must be one of allowed_models")
        return self

    def apply_to(self, limits: ResourceLimits) -> ResourceLimits:
        """The plan's limits with every set override applied."""
        return limits.model_copy(update=self.model_dump(exclude_none=True))

    @classmethod
    def from_stored(cls, overrides: dict[str, Any] | None) -> LimitOverrides:
        """Overrides as stored with a tenant, each above its upper bound taken at the bound.

        Releases before the bounds accepted any value, and tenants keep what they were
        given: validated as new input, such a stored override made every request of the
        tenant (and every operator listing of tenants) fail.

        Raises:
            ValidationError: a value no release accepted (wrong type, below its minimum).
        """
        values = dict(overrides or {})
        for name, field in cls.model_fields.items():
            value = values.get(name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            for bound in (getattr(m, "le", None) for m in field.metadata):
                if bound is not None and value > bound:
                    values[name] = bound
        return cls.model_validate(values)


class Plan(BaseModel):
    """A plan (tier): a name, its default limits and its scheduling weight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    limits: ResourceLimits
    weight: int = Field(ge=1, description="share in fair scheduling, relative to other plans")
    priority: int = Field(default=0, ge=0, description="strict scheduling tier (SLA plans run first)")


PLANS: dict[str, Plan] = {
    "free": Plan(
        name="free",
        weight=1,
        limits=ResourceLimits(
            requests_per_minute=120,
            max_concurrent_runs=4,
            tokens_per_day=2_000_000,
            runs_per_day=20_000,
            memory_bytes=10 * 2**20,
            max_agents=20,
            max_output_tokens_per_run=2_048,
            max_tool_calls_per_run=8,
            run_timeout_s=60,
            exec_memory_bytes=512 * 2**20,
            cpu_weight=100,
            cpu_quota_cores=0.5,
            cpu_seconds_per_run=30,
            max_processes=64,
            max_open_files=256,
            disk_bytes=64 * 2**20,
            execution_processes=2,
            code_timeout_s=10,
            code_output_bytes=64 * 2**10,
            # The simulated models and the providers' small models.
            allowed_models=(
                "simulated*",
                "openai:gpt-4o-mini*",
                "openai:gpt-4.1-mini*",
                "anthropic:claude-3-5-haiku*",
            ),
        ),
    ),
    "pro": Plan(
        name="pro",
        weight=4,
        limits=ResourceLimits(
            requests_per_minute=1_200,
            max_concurrent_runs=32,
            tokens_per_day=50_000_000,
            runs_per_day=1_000_000,
            memory_bytes=2**30,
            max_agents=500,
            max_output_tokens_per_run=8_192,
            max_tool_calls_per_run=32,
            run_timeout_s=300,
            exec_memory_bytes=2 * 2**30,
            cpu_weight=400,
            cpu_quota_cores=2.0,
            cpu_seconds_per_run=300,
            max_processes=256,
            max_open_files=1024,
            disk_bytes=2**30,
            execution_processes=8,
            code_timeout_s=30,
            code_output_bytes=256 * 2**10,
        ),
    ),
    "enterprise": Plan(
        name="enterprise",
        weight=16,
        priority=1,
        limits=ResourceLimits(
            requests_per_minute=12_000,
            max_concurrent_runs=128,
            tokens_per_day=1_000_000_000,
            runs_per_day=100_000_000,
            memory_bytes=100 * 2**30,
            max_agents=10_000,
            max_output_tokens_per_run=32_768,
            max_tool_calls_per_run=128,
            run_timeout_s=900,
            exec_memory_bytes=8 * 2**30,
            cpu_weight=1600,
            cpu_quota_cores=None,
            cpu_seconds_per_run=1800,
            max_processes=1024,
            max_open_files=4096,
            disk_bytes=10 * 2**30,
            execution_processes=32,
            code_timeout_s=60,
            code_output_bytes=2**20,
        ),
    ),
}


def get_plan(name: str) -> Plan:
    """The plan called ``name``.

    Raises:
        InvalidRequest: no such plan (the message lists the known ones).
    """
    try:
        return PLANS[name]
    except KeyError:
        raise InvalidRequest(
            f"unknown plan {name!r}; known plans: {', '.join(PLANS)}", field="plan"
        ) from None


def effective_limits(plan: str, overrides: dict[str, Any] | None) -> ResourceLimits:
    """The limits a tenant on ``plan`` with ``overrides`` (a LimitOverrides dict) runs under.

    Computed on every authenticated request; the result (immutable) is cached by plan and
    overrides, which are plain data, so tenants with the same plan and overrides share it.

    Raises:
        InvalidRequest: unknown plan.
        ValidationError: stored overrides no release accepted.
    """
    return _effective_limits(plan, json.dumps(overrides or {}, sort_keys=True))


@functools.lru_cache(maxsize=4096)
def _effective_limits(plan: str, overrides_json: str) -> ResourceLimits:
    return LimitOverrides.from_stored(json.loads(overrides_json)).apply_to(get_plan(plan).limits)
