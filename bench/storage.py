"""Storage cost of one agent run per storage model, with and without encryption, side by side.

What is timed: the storage calls of one agent run, made as :class:`~patinox.control.RunService`
makes them: ``tenant_store`` (the tenant-bound store every run makes first; for silo it
finds or opens the tenant's engine), ``create_run`` (input sealed), ``memory_put`` and
``memory_get`` (the agent's memory tool, value sealed), ``settle_run`` (output sealed;
usage and audit records in the same transaction) and ``get_run`` (the client reading the
result; input and output opened). ``run_total`` is the sum of those six per run. Reference
operations, *not* in ``run_total``: ``empty_tx`` (a tenant transaction with no statement:
the fixed cost of one transaction of that model) and, in encrypted cells,
``dek_cache_miss`` (the tenant's DEK read from the control plane and unwrapped, as after
the key cache's 300 s lifetime; the loop itself runs with warm key caches). The CPU time
of the run's seal/open calls alone (no database) is measured once, apart.

Storage models: SQLite ``pool`` and ``silo``; PostgreSQL ``pool``, ``bridge`` and ``silo``
(the local server; a scratch database per deployment, made with
:func:`patinox.storage.postgres.bootstrap` and the roles ``patinox_bench_owner`` /
``patinox_bench_app``, dropped at the end). Every (model, tenant count) is its own
deployment, so all cells are measured side by side in one interleaved loop: each round
runs one run in every cell, in a new random order, on a tenant drawn uniformly from that
deployment's tenants. "No encryption" replaces the store's sealer with an identity object
inside this benchmark only (Patinox itself has no such switch).

Tenants: created with :class:`~patinox.control.TenantManager` (which provisions bridge
schemas, silo databases and files) and seeded through the tenant store (one agent, one
settled run, one memory value each). Pool deployments above 10 tenants are filled faster:
tenant rows and their data are inserted in batches through the control-plane transaction,
with the same row shapes and payloads sealed by each tenant's own DEK through the real
sealer (DEKs made by a :class:`~patinox.storage.crypto.TenantKeyring`, stored wrapped).
Bridge and silo get 1,000 tenants only when creating them fits the growth budget
(projected from the creation time measured at 10 tenants, per deployment, and within the
whole set-up budget); 10,000 schemas, databases or files are never created. Cells not run
are listed, with the reason, in the JSON and the tables.

Payload sizes: the means of the Azure LLM inference trace 2023 conversation service
(``data/traces``): about 1,150 words of prompt and 210 words of output (one word = one
token, as the simulated model counts). The memory value is the run's output.

Output: ``bench/results/storage.json`` and tables. Nothing is asserted about time: the
issue's targets are reported met or not met. Run:
``.venv/bin/python bench/storage.py [--runs 300] [--growth-budget-s 100] [--setup-budget-s 200]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, insert, text

from patinox.control import TenantManager, TenantSpec
from patinox.errors import ConfigurationError
from patinox.replay.traces import AZURE_FILES, default_traces_dir, load_azure
from patinox.storage import SqlBackend, TenantStore, open_backend, utcnow
from patinox.storage import _schema as s
from patinox.storage import postgres as pg
from patinox.storage._sealer import Sealer
from patinox.storage.crypto import FileKeyProvider, InMemoryDekStore, TenantKeyring, key_provider_from_url
from patinox.storage.engine import normalise_url
from patinox.tenancy import StorageModel, TenantContext, get_plan, new_id

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "storage.json"
SIZES = (10, 1_000, 10_000)
PLAIN = "no encryption (benchmark-only identity sealer)"
SEALED = "encrypted (AES-256-GCM, per-tenant DEK)"
RUN_OPS = ("tenant_store", "create_run", "memory_put", "memory_get", "settle_run", "get_run")
REF_OPS = ("empty_tx",)
TOTAL = "run_total"
DEK_MISS = "dek_cache_miss"
TARGET_ENCRYPTION = 0.10  # encryption adds at most 10 % to a run's storage cost
TARGET_SCALING = 0.10  # pool at 10,000 tenants within 10 % of 10
BULK_BATCH = 500
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# (label, engine, storage model), in table order.
MODELS: tuple[tuple[str, str, StorageModel], ...] = (
    ("sqlite pool", "sqlite", StorageModel.POOL),
    ("sqlite silo", "sqlite", StorageModel.SILO),
    ("postgres pool", "postgres", StorageModel.POOL),
    ("postgres bridge", "postgres", StorageModel.BRIDGE),
    ("postgres silo", "postgres", StorageModel.SILO),
)
BASELINE = "sqlite pool"
console = Console(width=170)


# --- payloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """Texts of the runs: several prompts (rotated) and one output, in words."""

    prompts: tuple[str, ...]
    output: str
    prompt_words: int
    output_words: int
    source: str


_SYLLABLES = ("ka", "lo", "mi", "ten", "ra", "so", "vel", "dor", "an", "is", "ex", "tu", "pre", "con", "st")


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(n))


def make_payload(rng: random.Random) -> Payload:
    """Prompt and output sizes from the Azure conversation trace (means), as pseudo-word text."""
    name = AZURE_FILES["azure-conv"]
    try:
        reqs = load_azure(
            default_traces_dir() / "azure-llm-2023" / name, source="azure-conv", duration_s=None
        )
        prompt_words = round(statistics.fmean(r.prompt_tokens for r in reqs))
        output_words = round(statistics.fmean(r.output_tokens for r in reqs))
        source = f"means of {name} (Azure LLM inference trace 2023, {len(reqs)} requests)"
    except (ConfigurationError, OSError, ValueError) as err:
        prompt_words, output_words = 1_155, 211
        source = f"fallback sizes (the trace could not be read: {type(err).__name__})"
    prompts = tuple(_words(rng, prompt_words) for _ in range(8))
    return Payload(prompts, _words(rng, output_words), prompt_words, output_words, source)


# --- the benchmark-only identity sealer ---------------------------------------------------------


class IdentitySealer:
    """Stores payloads as given: the 'no encryption' cells. Benchmark only; Patinox has no such mode."""

    __slots__ = ("tenant_id",)

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id

    def seal(self, table: str, record_id: str, text: str) -> bytes:
        return text.encode("utf-8")  # the payload columns are binary

    def open(self, table: str, record_id: str, stored: bytes | None) -> str | None:
        return None if stored is None else bytes(stored).decode("utf-8")


# --- deployments ----------------------------------------------------------------------------------


@dataclass
class Deployment:
    """One database (SQLite file or PostgreSQL database) holding ``size`` tenants of one model."""

    model: str
    engine: str
    storage_model: StorageModel
    size: int
    backend: SqlBackend
    database: str | None = None
    tenants: list[tuple[TenantContext, str]] = field(default_factory=list)  # (context, agent id)
    create_ms: list[float] = field(default_factory=list)  # TenantManager.create, per tenant
    seed_ms: list[float] = field(default_factory=list)  # agent + one run through the store
    bulk_tenants: int = 0
    bulk_s: float = 0.0
    setup_s: float = 0.0


def tenant_context(tenant_id: str, model: StorageModel) -> TenantContext:
    return TenantContext(
        tenant_id=tenant_id,
        principal="bench",
        scopes=frozenset(),
        plan="free",
        limits=get_plan("free").limits,
        storage_model=model,
    )


def agent_values() -> dict[str, Any]:
    return {
        "name": "assistant",
        "instructions": "Answer the user's question in a short paragraph; keep notes in memory.",
        "model": "simulated",
        "tools": ["memory"],
        "max_output_tokens": None,
        "max_tool_calls": None,
    }


def run_values(agent_id: str, prompt: str, output_words: int) -> dict[str, Any]:
    """The fields :meth:`RunService.start` gives ``create_run`` for a sync run."""
    now = utcnow()
    return {
        "agent_id": agent_id,
        "principal": "bench",
        "mode": "sync",
        "status": "running",
        "input": prompt,
        "requested_output_tokens": output_words,
        "model": "simulated",
        "simulated": 1,
        "input_tokens": 0,
        "output_tokens": 0,
        "tool_calls": 0,
        "created_at": now,
        "started_at": now,
    }


def settle_values(
    run_id: str, agent_id: str, p: Payload
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``values``, ``usage`` and ``audit`` as :class:`RunService` settles a succeeded run."""
    tokens = {"input_tokens": p.prompt_words, "output_tokens": p.output_words, "tool_calls": 2}
    values = {
        "status": "succeeded",
        "output": p.output,
        "finished_at": utcnow(),
        **tokens,
        "duration_ms": 812.5,
    }
    usage = {"model": "simulated", "simulated": 1, **tokens, "duration_ms": 812.5}
    audit = {
        "actor": "bench",
        "action": "run.finish",
        "target": run_id,
        "outcome": "ok",
        "detail": {"agent_id": agent_id, "status": "succeeded", **tokens},
    }
    return values, usage, audit


def seed_run(store: TenantStore, agent_id: str, p: Payload, k: int) -> None:
    """One run's writes, untimed: the data every tenant already has."""
    run = store.create_run(run_values(agent_id, p.prompts[k % len(p.prompts)], p.output_words))
    store.memory_put("note-seed", p.output)
    values, usage, audit = settle_values(run["id"], agent_id, p)
    store.settle_run(run["id"], values, usage=usage, audit=audit)


def add_tenant(dep: Deployment, manager: TenantManager, p: Payload) -> None:
    """Create one tenant through the tenant manager and seed it through its store."""
    t0 = time.perf_counter()
    spec = TenantSpec(name=f"bench-{len(dep.tenants):05d}", storage_model=dep.storage_model)
    tenant = manager.create(spec, actor="bench")
    t1 = time.perf_counter()
    ctx = tenant_context(tenant.id, dep.storage_model)
    store = dep.backend.tenant_store(ctx)
    agent = store.create_agent(agent_values())
    seed_run(store, agent["id"], p, len(dep.tenants))
    t2 = time.perf_counter()
    dep.create_ms.append((t1 - t0) * 1000)
    dep.seed_ms.append((t2 - t1) * 1000)
    dep.tenants.append((ctx, agent["id"]))


def _bulk_rows(tenant_id: str, index: int, sealer: Sealer, p: Payload) -> dict[str, list[dict[str, Any]]]:
    """The rows :func:`add_tenant` leaves for a pool tenant, payloads sealed by its real sealer."""
    now = utcnow()
    agent_id, run_id, key = new_id("ag"), new_id("run"), "note-seed"
    values, usage, audit = settle_values(run_id, agent_id, p)
    run = {**run_values(agent_id, p.prompts[index % len(p.prompts)], p.output_words), **values}
    run.update(
        tenant_id=tenant_id,
        id=run_id,
        input=sealer.seal("runs.input", run_id, run["input"]),
        output=sealer.seal("runs.output", run_id, p.output),
    )
    detail = {"name": f"bench-{index:05d}", "plan": "free", "storage_model": "pool"}
    return {
        "tenants": [
            {
                "id": tenant_id,
                "name": f"bench-{index:05d}",
                "plan": "free",
                "state": "active",
                "isolation_level": "namespace",
                "storage_model": "pool",
                "limit_overrides": {},
                "created_at": now,
                "updated_at": now,
                "deleted_at": None,
            }
        ],
        "agents": [
            {**agent_values(), "tenant_id": tenant_id, "id": agent_id, "created_at": now, "updated_at": now}
        ],
        "runs": [run],
        "memory": [
            {
                "tenant_id": tenant_id,
                "key": key,
                "value": sealer.seal("memory.value", key, p.output),
                "updated_at": now,
            }
        ],
        "usage_records": [{**usage, "tenant_id": tenant_id, "id": new_id("us"), "run_id": run_id, "at": now}],
        "audit_log": [
            _audit_row(tenant_id, "tenant.create", tenant_id, detail, now),
            _audit_row(tenant_id, audit["action"], run_id, audit["detail"], now),
        ],
    }


def _audit_row(tenant_id: str, action: str, target: str, detail: dict[str, Any], at: Any) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "id": new_id("au"),
        "at": at,
        "actor": "bench",
        "action": action,
        "target": target,
        "outcome": "ok",
        "detail": detail,
    }


_BULK_ORDER = ("tenants", "tenant_keys", "agents", "runs", "memory", "usage_records", "audit_log")


def add_tenants_bulk(dep: Deployment, count: int, p: Payload) -> None:
    """Add ``count`` pool tenants with their data in batches (the fast path for pool only)."""
    t0 = time.perf_counter()
    dek_store = InMemoryDekStore()
    keyring = TenantKeyring(dek_store, dep.backend.keyring.provider)
    start = len(dep.tenants)
    for first in range(start, start + count, BULK_BATCH):
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in _BULK_ORDER}
        added: list[tuple[TenantContext, str]] = []
        for index in range(first, min(first + BULK_BATCH, start + count)):
            tenant_id = new_id("tn")
            for name, got in _bulk_rows(tenant_id, index, Sealer(keyring, tenant_id), p).items():
                rows[name] += got
            rows["tenant_keys"] += [
                {"tenant_id": tenant_id, "version": v, "wrapped": w, "created_at": utcnow()}
                for v, w in dek_store.list_wrapped(tenant_id)
            ]
            added.append((tenant_context(tenant_id, StorageModel.POOL), rows["agents"][-1]["id"]))
        with dep.backend.transaction() as conn:
            for name in _BULK_ORDER:
                conn.execute(insert(s.metadata.tables[name]), rows[name])
        dep.tenants += added
    dep.bulk_tenants += count
    dep.bulk_s += time.perf_counter() - t0


# --- the lab: scratch databases, opened and removed ------------------------------------------------


class Lab:
    """Owns the temporary folder, the KEK file and the scratch PostgreSQL databases."""

    def __init__(self, tmp: Path, admin_url: str, stack: ExitStack) -> None:
        self.tmp = tmp
        self.admin_url = admin_url
        self.kek_url = f"file://{tmp / 'kek.json'}"
        FileKeyProvider.create(tmp / "kek.json")
        self.stack = stack
        self.pg_error = self._probe_postgres()

    def _probe_postgres(self) -> str | None:
        engine = create_engine(normalise_url(self.admin_url))
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as err:
            return f"PostgreSQL not reachable at {self.admin_url}: {type(err).__name__}"
        finally:
            engine.dispose()
        return None

    def open(self, model: str, engine: str, storage_model: StorageModel, size: int) -> Deployment:
        t0 = time.perf_counter()
        kp = key_provider_from_url(self.kek_url)
        slug = f"{model.split()[1]}_{size}"
        if engine == "sqlite":
            folder = self.tmp / slug
            folder.mkdir()
            backend = open_backend(f"sqlite:///{folder / 'main.db'}", key_provider=kp)
            database = None
        else:
            database = f"patinox_bench_{os.getpid()}_{slug}"
            self.stack.callback(pg.drop, self.admin_url, database=database)
            dep = pg.bootstrap(
                self.admin_url,
                database=database,
                owner_role="patinox_bench_owner",
                app_role="patinox_bench_app",
            )
            backend = open_backend(dep.app_url, owner_url=dep.owner_url, key_provider=kp)
        self.stack.callback(backend.close)
        return Deployment(
            model, engine, storage_model, size, backend, database, setup_s=time.perf_counter() - t0
        )


def finish_setup(dep: Deployment) -> None:
    """PostgreSQL: ANALYZE (as autovacuum would after a load) and close the owner's DDL connections."""
    if dep.engine != "postgres":
        return
    owner = dep.backend.placements.owner
    with owner.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    owner.dispose()


def database_bytes(dep: Deployment, lab: Lab) -> int | None:
    """Size on disk of the deployment's main database (bytes)."""
    if dep.database is None:
        folder = lab.tmp / f"{dep.model.split()[1]}_{dep.size}"
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    with dep.backend.transaction() as conn:
        return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


# --- measurement ------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One deployment measured with or without encryption."""

    dep: Deployment
    plain: bool
    choices: list[int] = field(default_factory=list)  # tenant index per run, drawn up front
    samples: dict[str, list[int]] = field(default_factory=dict)  # op -> nanoseconds

    @property
    def encryption(self) -> str:
        return PLAIN if self.plain else SEALED

    def run(self, p: Payload, k: int, *, record: bool) -> None:
        """Run ``k``'s storage calls on its tenant (drawn beforehand), each timed.

        Arguments are built before each timed call, so a timing is the store call alone.
        """
        ctx, agent_id = self.dep.tenants[self.choices[k]]
        clock = time.perf_counter_ns
        create = run_values(agent_id, p.prompts[k % len(p.prompts)], p.output_words)
        t = [clock()]
        store = self.dep.backend.tenant_store(ctx)
        if self.plain:
            store._sealer = IdentitySealer(ctx.tenant_id)  # type: ignore[assignment]
        t.append(clock())
        run = store.create_run(create)
        t.append(clock())
        key = f"note-{run['id']}"
        values, usage, audit = settle_values(run["id"], agent_id, p)
        t.append(clock())
        store.memory_put(key, p.output)
        t.append(clock())
        note = store.memory_get(key)
        t.append(clock())
        store.settle_run(run["id"], values, usage=usage, audit=audit)
        t.append(clock())
        got = store.get_run(run["id"])
        t.append(clock())
        with store._tx():
            pass
        t.append(clock())
        if note != p.output or got["output"] != p.output or got["input"] != create["input"]:
            raise RuntimeError(f"{self.dep.model}: a payload did not read back as written")
        if record:
            # t: start, store made, run created, args built, put, get, settled, read, empty tx
            spans = {
                "tenant_store": t[1] - t[0],
                "create_run": t[2] - t[1],
                "memory_put": t[4] - t[3],
                "memory_get": t[5] - t[4],
                "settle_run": t[6] - t[5],
                "get_run": t[7] - t[6],
                "empty_tx": t[8] - t[7],
            }
            spans[TOTAL] = sum(spans[op] for op in RUN_OPS)
            for op, ns in spans.items():
                self.samples.setdefault(op, []).append(ns)


def warm_keys(cells: list[Cell]) -> None:
    """Load the DEK of every tenant an encrypted cell will use into the key cache, with a fresh
    lifetime: the steady state of an active tenant. A miss is measured apart (``dek_cache_miss``).
    """
    for cell in cells:
        if cell.plain:
            continue
        keyring = cell.dep.backend.keyring
        for i in sorted(set(cell.choices)):
            tenant_id = cell.dep.tenants[i][0].tenant_id
            keyring.forget(tenant_id)
            keyring.current_key(tenant_id)


def measure(cells: list[Cell], p: Payload, runs: int, warmup: int, rng: random.Random) -> None:
    """Interleave the cells: each round runs once in every cell, in a new random order."""
    order = list(range(len(cells)))
    for k in range(warmup + runs):
        rng.shuffle(order)
        for i in order:
            cells[i].run(p, k, record=k >= warmup)
        if k == warmup - 1:
            gc.collect()
        if k >= warmup and (k - warmup + 1) % 100 == 0:
            console.print(f"  {k - warmup + 1}/{runs} rounds of {len(cells)} cells")


def measure_dek_misses(cells: list[Cell], samples: int, rng: random.Random) -> None:
    """Time a DEK cache miss per encrypted deployment: forget the tenant's key, then load it."""
    for cell in cells:
        if cell.plain:
            continue
        keyring = cell.dep.backend.keyring
        for _ in range(samples):
            ctx, _agent = cell.dep.tenants[rng.randrange(len(cell.dep.tenants))]
            keyring.forget(ctx.tenant_id)
            t0 = time.perf_counter_ns()
            keyring.current_key(ctx.tenant_id)
            cell.samples.setdefault(DEK_MISS, []).append(time.perf_counter_ns() - t0)


def measure_crypto_cpu(dep: Deployment, p: Payload, samples: int = 300) -> dict[str, Any]:
    """CPU time of one run's seal/open calls alone, with a real tenant sealer and no database:
    seal input, memory value and output; open the memory value, input and output."""
    ctx, _ = dep.tenants[0]
    sealer = dep.backend.tenant_store(ctx)._sealer
    times = []
    for k in range(samples):
        rid, key, prompt = new_id("run"), f"note-{k}", p.prompts[k % len(p.prompts)]
        t0 = time.perf_counter_ns()
        stored_in = sealer.seal("runs.input", rid, prompt)
        stored_mem = sealer.seal("memory.value", key, p.output)
        sealer.open("memory.value", key, stored_mem)
        stored_out = sealer.seal("runs.output", rid, p.output)
        sealer.open("runs.input", rid, stored_in)
        sealer.open("runs.output", rid, stored_out)
        times.append(time.perf_counter_ns() - t0)
    plain_bytes = len(p.prompts[0].encode()) + 2 * len(p.output.encode())
    sealed_bytes = len(sealer.seal("runs.input", "x", p.prompts[0])) + 2 * len(
        sealer.seal("runs.output", "x", p.output)
    )
    return {
        "what": "seal/open calls of one run, in process (AES-256-GCM + base64), no database",
        "median_us": round(statistics.median(times) / 1000, 1),
        "p90_us": round(quantile(times, 0.9) / 1000, 1),
        "payload_bytes_plain": plain_bytes,
        "payload_bytes_stored_sealed": sealed_bytes,
    }


# --- set-up plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Seconds allowed to create one bridge/silo deployment, and for the whole set-up."""

    growth_s: float
    setup_s: float
    started: float  # time.monotonic() at start


def plan_growth(dep10: Deployment, size: int, budget: Budget) -> tuple[bool, float, str]:
    """Whether to create a ``size``-tenant deployment of a bridge/silo model, projected from the
    creation time measured at 10 tenants. Returns (run it, projected seconds, reason when not)."""
    per_tenant_ms = statistics.median(a + b for a, b in zip(dep10.create_ms, dep10.seed_ms, strict=True))
    projected = per_tenant_ms * size / 1000
    what = {StorageModel.BRIDGE: "schemas", StorageModel.SILO: "databases"}[dep10.storage_model]
    if dep10.engine == "sqlite":
        what = "database files"
    elapsed = time.monotonic() - budget.started
    if projected <= budget.growth_s and elapsed + projected <= budget.setup_s:
        return True, projected, ""
    why = (
        f"above this benchmark's growth budget of {budget.growth_s:,.0f} s per deployment"
        if projected > budget.growth_s
        else f"{elapsed:,.0f} s of set-up already spent, of a set-up budget of {budget.setup_s:,.0f} s"
    )
    reason = (
        f"not run: creating {size:,} tenants ({size:,} {what}, each migrated, plus seeding) is projected "
        f"at {projected:,.0f} s ({per_tenant_ms:,.0f} ms per tenant measured at 10 tenants); {why}"
    )
    return False, projected, reason


@dataclass
class NotRun:
    model: str
    tenants: int
    reason: str
    projected_creation_s: float | None = None


def build(lab: Lab, p: Payload, budget: Budget) -> tuple[list[Deployment], list[NotRun]]:
    """Create every deployment that fits; list the cells that do not, with why."""
    deps: list[Deployment] = []
    not_run: list[NotRun] = []
    tens: dict[str, Deployment] = {}
    for model, engine, sm in MODELS:
        if engine == "postgres" and lab.pg_error:
            not_run += [NotRun(model, n, f"not run: {lab.pg_error}") for n in SIZES]
            continue
        for n in SIZES:
            if sm is not StorageModel.POOL and n > 10:
                ok, projected, reason = plan_growth(tens[model], n, budget)
                if not ok:
                    not_run.append(NotRun(model, n, reason, round(projected, 1)))
                    continue
            t0 = time.perf_counter()
            dep = lab.open(model, engine, sm, n)
            manager = TenantManager(dep.backend)
            real = n if sm is not StorageModel.POOL else min(n, 10)
            for _ in range(real):
                add_tenant(dep, manager, p)
            if n > real:
                add_tenants_bulk(dep, n - real, p)
            finish_setup(dep)
            dep.setup_s += time.perf_counter() - t0
            deps.append(dep)
            if n == 10:
                tens[model] = dep
            console.print(
                f"  {model:<16} {n:>6,} tenants ready in {dep.setup_s:6.1f} s (create "
                f"{statistics.median(dep.create_ms):6.1f} ms/tenant median, {dep.bulk_tenants:,} bulk)"
            )
    return deps, not_run


# --- report -------------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def cell_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    """One JSON row per (cell, op), ratios against SQLite pool without encryption at the same size."""
    med = {
        (c.dep.model, c.dep.size, c.plain, op): statistics.median(v)
        for c in cells
        for op, v in c.samples.items()
    }
    out = []
    for c in cells:
        for op in (*RUN_OPS, TOTAL, *REF_OPS, DEK_MISS):
            v = c.samples.get(op)
            if not v:
                continue
            base = med.get((BASELINE, c.dep.size, True, op))
            out.append(
                {
                    "model": c.dep.model,
                    "tenants": c.dep.size,
                    "encryption": c.encryption,
                    "op": op,
                    "in_run_total": op in RUN_OPS,
                    "median_us": round(statistics.median(v) / 1000, 1),
                    "p90_us": round(quantile(v, 0.90) / 1000, 1),
                    "samples": len(v),
                    "ratio_to_sqlite_pool_plain": round(statistics.median(v) / base, 3) if base else None,
                }
            )
    return out


def _lookup(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str, str], dict[str, Any]]:
    return {(r["model"], r["tenants"], r["encryption"], r["op"]): r for r in rows}


def encryption_overhead(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = _lookup(rows)
    out = []
    for model, _, _ in MODELS:
        for n in SIZES:
            plain, sealed = by.get((model, n, PLAIN, TOTAL)), by.get((model, n, SEALED, TOTAL))
            if not plain or not sealed:
                continue
            per_op = {
                op: round(
                    by[(model, n, SEALED, op)]["median_us"] / by[(model, n, PLAIN, op)]["median_us"] - 1, 3
                )
                for op in RUN_OPS
            }
            overhead = sealed["median_us"] / plain["median_us"] - 1
            out.append(
                {
                    "model": model,
                    "tenants": n,
                    "run_us_plain": plain["median_us"],
                    "run_us_encrypted": sealed["median_us"],
                    "overhead": round(overhead, 3),
                    "overhead_per_op": per_op,
                    "target_met": overhead <= TARGET_ENCRYPTION,
                }
            )
    return out


def pool_scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = _lookup(rows)
    out = []
    for model in ("sqlite pool", "postgres pool"):
        for enc in (PLAIN, SEALED):
            small, big = by.get((model, 10, enc, TOTAL)), by.get((model, 10_000, enc, TOTAL))
            if not small or not big:
                continue
            ratio = big["median_us"] / small["median_us"]
            per_op = {
                op: round(
                    by[(model, 10_000, enc, op)]["median_us"] / by[(model, 10, enc, op)]["median_us"], 3
                )
                for op in RUN_OPS
            }
            out.append(
                {
                    "model": model,
                    "encryption": enc,
                    "run_us_10": small["median_us"],
                    "run_us_10000": big["median_us"],
                    "ratio_10000_to_10": round(ratio, 3),
                    "ratio_per_op": per_op,
                    "target_met": ratio <= 1 + TARGET_SCALING,
                }
            )
    return out


def targets(overhead: list[dict[str, Any]], scaling: list[dict[str, Any]]) -> list[dict[str, Any]]:
    worst_enc = max(overhead, key=lambda r: r["overhead"], default=None)
    worst_scale = max(scaling, key=lambda r: r["ratio_10000_to_10"], default=None)
    return [
        {
            "target": "encryption adds <= 10 % to a run's storage cost (every model and size measured)",
            "measured": {f"{r['model']} @ {r['tenants']:,}": f"{r['overhead']:+.1%}" for r in overhead},
            "worst": None
            if worst_enc is None
            else f"{worst_enc['model']} @ {worst_enc['tenants']:,}: {worst_enc['overhead']:+.1%}",
            "met": bool(overhead) and all(r["target_met"] for r in overhead),
        },
        {
            "target": "pool run storage cost at 10,000 tenants within 10 % of 10 tenants",
            "measured": {
                f"{r['model']}, {r['encryption']}": f"x{r['ratio_10000_to_10']:.3f}" for r in scaling
            },
            "worst": None
            if worst_scale is None
            else f"{worst_scale['model']}, {worst_scale['encryption']}: "
            f"x{worst_scale['ratio_10000_to_10']:.3f}",
            "met": bool(scaling) and all(r["target_met"] for r in scaling),
        },
    ]


def deployment_rows(deps: list[Deployment], lab: Lab) -> list[dict[str, Any]]:
    out = []
    for d in deps:
        real = len(d.create_ms)
        out.append(
            {
                "model": d.model,
                "tenants": d.size,
                "created_through_tenant_manager": real,
                "create_ms_median": round(statistics.median(d.create_ms), 1),
                "create_ms_p90": round(quantile(d.create_ms, 0.9), 1),
                "seed_ms_median": round(statistics.median(d.seed_ms), 1),
                "bulk_inserted": d.bulk_tenants,
                "bulk_s": round(d.bulk_s, 1),
                "setup_s": round(d.setup_s, 1),
                "database_bytes": database_bytes(d, lab),
            }
        )
    return out


# --- tables ---------------------------------------------------------------------------------------


def _fmt_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "[dim]not run[/dim]"
    ratio = r["ratio_to_sqlite_pool_plain"]
    return f"{r['median_us']:,.0f} / {r['p90_us']:,.0f} µs  [bold]x{ratio:.2f}[/bold]"


def _enc_short(enc: str) -> str:
    return "none*" if enc == PLAIN else "aes-gcm"


def run_table(by: dict[tuple[str, int, str, str], dict[str, Any]]) -> Table:
    t = Table(
        title="Storage cost of one run (tenant_store + create_run + memory_put + memory_get + settle_run "
        "+ get_run): median / p90 µs, x ratio to sqlite pool without encryption at the same tenant count"
    )
    t.add_column("model")
    t.add_column("encryption")
    for n in SIZES:
        t.add_column(f"{n:,} tenants", justify="right")
    for model, _, _ in MODELS:
        for enc in (PLAIN, SEALED):
            t.add_row(model, enc, *(_fmt_cell(by.get((model, n, enc, TOTAL))) for n in SIZES))
    return t


def _fmt_op(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    ratio = r["ratio_to_sqlite_pool_plain"]
    return f"{r['median_us']:,.0f}" + (f" x{ratio:.2f}" if ratio else "")


def op_table(by: dict[tuple[str, int, str, str], dict[str, Any]]) -> Table:
    ops = (*RUN_OPS, *REF_OPS, DEK_MISS)
    t = Table(
        title="Per operation: median µs, x ratio to the same op of sqlite pool without encryption, same size"
    )
    for col in ("model", "tenants", "enc", *ops):
        t.add_column(col, justify="right")
    for model, _, _ in MODELS:
        for n in SIZES:
            for enc in (PLAIN, SEALED):
                if (model, n, enc, TOTAL) in by:
                    vals = [_fmt_op(by.get((model, n, enc, op))) for op in ops]
                    t.add_row(model, f"{n:,}", _enc_short(enc), *vals)
    return t


def deployment_table(deployments: list[dict[str, Any]]) -> Table:
    t = Table(title="Deployments: tenants and what creating them cost")
    cols = (
        "model",
        "tenants",
        "via TenantManager",
        "create ms p50/p90",
        "seed ms p50",
        "bulk",
        "set-up s",
        "MB",
    )
    for col in cols:
        t.add_column(col, justify="right")
    for d in deployments:
        t.add_row(
            d["model"],
            f"{d['tenants']:,}",
            f"{d['created_through_tenant_manager']:,}",
            f"{d['create_ms_median']:,.1f} / {d['create_ms_p90']:,.1f}",
            f"{d['seed_ms_median']:,.1f}",
            f"{d['bulk_inserted']:,} in {d['bulk_s']:.1f} s",
            f"{d['setup_s']:.1f}",
            f"{(d['database_bytes'] or 0) / 1e6:,.0f}",
        )
    return t


def _mark(met: bool) -> str:
    return "[green]met[/green]" if met else "[red]not met[/red]"


def print_tables(report: dict[str, Any]) -> None:
    by = _lookup(report["cells"])
    console.print(run_table(by))
    console.print(op_table(by))
    console.print(f"* none = {PLAIN}")
    console.print(deployment_table(report["deployments"]))
    for nr in report["not_run"]:
        console.print(f"[yellow]{nr['model']} @ {nr['tenants']:,} tenants[/yellow]: {nr['reason']}")
    c = report["derived"]["crypto_cpu_per_run"]
    console.print(
        f"crypto CPU per run (no database): {c['median_us']:,.0f} µs median; payload bytes stored "
        f"{c['payload_bytes_plain']:,} plain -> {c['payload_bytes_stored_sealed']:,} sealed"
    )
    for r in report["derived"]["encryption_overhead"]:
        console.print(
            f"encryption overhead {r['model']:<16} @ {r['tenants']:>6,}: {r['overhead']:+7.1%} "
            f"({r['run_us_plain']:,.0f} -> {r['run_us_encrypted']:,.0f} µs) {_mark(r['target_met'])}"
        )
    for r in report["derived"]["pool_scaling"]:
        console.print(
            f"pool scaling {r['model']:<14} {_enc_short(r['encryption']):<8}: 10,000 vs 10 tenants "
            f"x{r['ratio_10000_to_10']:.3f} ({r['run_us_10']:,.0f} -> {r['run_us_10000']:,.0f} µs) "
            f"{_mark(r['target_met'])}"
        )
    for tg in report["targets"]:
        console.print(f"target: {tg['target']}: worst {tg['worst']} -> {_mark(tg['met'])}")


# --- main -------------------------------------------------------------------------------------------


@contextmanager
def lab_context(admin_url: str) -> Iterator[Lab]:
    tmp = Path(tempfile.mkdtemp(prefix="patinox-bench-storage-"))
    try:
        with ExitStack() as stack:  # closes backends, then drops databases (reverse order)
            yield Lab(tmp, admin_url, stack)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Storage cost of a run per storage model, side by side")
    parser.add_argument("--runs", type=int, default=300, help="measured runs per cell")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured runs per cell first")
    parser.add_argument(
        "--growth-budget-s",
        type=float,
        default=100.0,
        help="max projected seconds to create one bridge/silo deployment of 1,000 tenants",
    )
    parser.add_argument(
        "--setup-budget-s", type=float, default=200.0, help="max seconds for the whole set-up"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--pg-admin-url", default=os.environ.get("PATINOX_BENCH_PG_ADMIN_URL", DEFAULT_ADMIN_URL)
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON report path")
    args = parser.parse_args()

    started = time.monotonic()
    rng = random.Random(args.seed)
    p = make_payload(rng)
    console.print(f"payload: {p.prompt_words} prompt words, {p.output_words} output words ({p.source})")
    with lab_context(args.pg_admin_url) as lab:
        console.print("set-up:")
        deps, not_run = build(lab, p, Budget(args.growth_budget_s, args.setup_budget_s, started))
        setup_s = time.monotonic() - started
        n_runs = args.warmup + args.runs
        cells = [
            Cell(d, plain, [rng.randrange(len(d.tenants)) for _ in range(n_runs)])
            for d in deps
            for plain in (True, False)
        ]
        warm_keys(cells)
        console.print(f"measuring {len(cells)} cells side by side, {args.runs} runs each:")
        t0 = time.monotonic()
        measure(cells, p, args.runs, args.warmup, rng)
        measure_dek_misses(cells, 30, rng)
        measure_s = time.monotonic() - t0
        crypto_cpu = measure_crypto_cpu(deps[0], p)
        deployments = deployment_rows(deps, lab)
    rows = cell_rows(cells)
    overhead, scaling = encryption_overhead(rows), pool_scaling(rows)
    report = {
        "bench": "storage",
        "what": "storage cost of one agent run per storage model and tenant count, with and without "
        "encryption, measured side by side in one interleaved loop (one thread)",
        "ops_in_run_total": list(RUN_OPS),
        "reference_ops": {
            "empty_tx": "a tenant transaction with no statement: the fixed cost of one transaction; "
            "not in run_total",
            DEK_MISS: "loading a tenant's DEK after a key-cache miss (control-plane read + unwrap); "
            "not in run_total (the loop runs with warm key caches)",
        },
        "encryption_labels": {"plain": PLAIN, "encrypted": SEALED},
        "ratio_baseline": "sqlite pool, no encryption, same tenant count, same op",
        "payload": {
            "prompt_words": p.prompt_words,
            "output_words": p.output_words,
            "memory_value_words": p.output_words,
            "source": p.source,
        },
        "params": {
            "runs_per_cell": args.runs,
            "warmup_runs_per_cell": args.warmup,
            "seed": args.seed,
            "growth_budget_s": args.growth_budget_s,
            "setup_budget_s": args.setup_budget_s,
            "tenant_choice": "uniform over the deployment's tenants",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "deployments": deployments,
        "not_run": [
            {
                "model": n.model,
                "tenants": n.tenants,
                "encryption": "both",
                "reason": n.reason,
                "projected_creation_s": n.projected_creation_s,
            }
            for n in not_run
        ],
        "cells": rows,
        "derived": {
            "encryption_overhead": overhead,
            "pool_scaling": scaling,
            "crypto_cpu_per_run": crypto_cpu,
        },
        "targets": targets(overhead, scaling),
        "setup_s": round(setup_s, 1),
        "measure_s": round(measure_s, 1),
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    console.print(
        f"report: {args.out} (wall time {report['wall_time_s']} s: set-up {report['setup_s']} s, "
        f"measuring {report['measure_s']} s)"
    )


if __name__ == "__main__":
    main()
