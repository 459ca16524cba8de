"""The conformance checks other than the state machine, one function each.

Every check makes its own tenants (fresh names), works through the HTTP API where a
tenant would, and looks below Patinox (:mod:`patinox.conformance._raw`) where an
attacker with the database would. A check passes by returning and fails by raising
:class:`~patinox.conformance._deployment.ConformanceFailure`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection, create_engine, text

from patinox.conformance import _raw, _worker
from patinox.conformance._deployment import (
    ID_RE,
    PROBES,
    Answer,
    ConformanceFailure,
    SuiteEnv,
    Target,
    TenantHandle,
    check,
    memory_get_call,
)
from patinox.errors import DecryptionFailed, NotFound, PatinoxError, TenantContextMissing, TenantKeysDestroyed
from patinox.storage import SqlBackend
from patinox.storage.crypto import decrypt_str, key_provider_from_url
from patinox.storage.engine import normalise_url, with_database
from patinox.tenancy import (
    StorageModel,
    TenantContext,
    TenantThreadPoolExecutor,
    current_tenant,
    new_id,
    run_in_thread,
    tenant_scope,
)

_TIMEOUT_S = 120.0


def _raises(
    fn: Callable[..., object], *errors: type[BaseException], args: tuple[object, ...] = ()
) -> BaseException | None:
    """The error ``fn(*args)`` raised if it is one of ``errors``; ``None`` if it returned."""
    try:
        fn(*args)
    except errors as err:
        return err
    return None


def _decrypts(
    backend: SqlBackend, tenant_id: str, table: str, record_id: str, sealed: bytes | None
) -> str | None:
    """The plaintext of a stored sealed value, or ``None`` when it no longer decrypts."""
    assert sealed is not None
    try:
        return decrypt_str(
            sealed,
            key_lookup=backend.keyring.key_lookup(tenant_id),
            tenant_id=tenant_id,
            table=table,
            record_id=record_id,
        )
    except (TenantKeysDestroyed, DecryptionFailed):
        return None


def _seed(t: Target, tenant: TenantHandle) -> dict[str, str]:
    """Give ``tenant`` an agent, a memory value and a run that reads it back; every stored
    string is a fresh marker. Returns the markers and ids by role."""
    m = t.markers
    s = {
        "key": m.atom(),
        "value": m.atom(),
        "agent_name": m.atom(),
        "instructions": m.atom(),
        "prompt": m.atom(),
    }
    t.put_memory(tenant, s["key"], s["value"])
    s["agent_id"] = t.new_agent(tenant, s["agent_name"], s["instructions"])
    run = t.run(tenant, s["agent_id"], f"{s['prompt']} question\n{memory_get_call(s['key'])}")
    check(s["value"] in str(run["output"]), f"the run's memory_get did not return the tenant's value: {run}")
    s["run_id"] = str(run["id"])
    return s


# -- encryption at rest -----------------------------------------------------------------------


def no_plaintext_at_rest(t: Target, _: SuiteEnv) -> None:
    """Raw storage holds no plaintext of an encrypted payload (memory values, run inputs,
    run outputs), while it does hold the unencrypted columns of the same rows."""
    tenants = [t.new_tenant(label) for label in ("plain-a", "plain-b")]
    seeds = [_seed(t, x) for x in tenants]
    raw = _raw.stored_bytes(t)
    for x, s in zip(tenants, seeds, strict=True):
        sealed = _raw.read_cell(t, x.id, "memory", "value", "key", s["key"])
        check(
            sealed is not None and _raw.scan_form(t, sealed) in raw,
            "the stored ciphertext of a memory value is not in raw storage: the scan missed the rows",
        )
        # Positive control: names and keys are stored in clear, so the scan saw these rows.
        for visible in ("agent_name", "key"):
            check(
                s[visible].encode() in raw,
                f"raw scan did not reach the rows holding the {visible} {s[visible]}",
            )
        for secret in ("value", "prompt"):
            check(
                s[secret].encode() not in raw, f"plaintext of an encrypted payload ({secret}) in raw storage"
            )


def ciphertext_bound_to_row(t: Target, _: SuiteEnv) -> None:
    """A ciphertext copied to another row, column or tenant fails authentication: the API
    answers ``500 decryption_failed`` and shows no plaintext."""
    a, b = t.new_tenant("move-a"), t.new_tenant("move-b")
    m = t.markers
    k1, k2, secret = m.atom(), m.atom(), m.atom()
    t.put_memory(a, k1, secret)
    t.put_memory(a, k2, "placeholder")
    t.put_memory(b, k1, "placeholder")
    aid, bid = t.new_agent(a, "mover"), t.new_agent(b, "mover")
    prompt = m.atom()
    r1 = t.run(a, aid, prompt)["id"]
    r2, r3 = t.run(a, aid, m.atom())["id"], t.run(a, aid, m.atom())["id"]
    rb = t.run(b, bid, m.atom())["id"]
    moves = [
        (
            "memory value to another key of the same tenant",
            (a, "memory", "value", "key", k1),
            (a, "memory", "value", "key", k2),
            a,
            f"/v1/memory/{k2}",
            secret,
        ),
        (
            "memory value to the same key of another tenant",
            (a, "memory", "value", "key", k1),
            (b, "memory", "value", "key", k1),
            b,
            f"/v1/memory/{k1}",
            secret,
        ),
        (
            "run input to another run of the same tenant",
            (a, "runs", "input", "id", r1),
            (a, "runs", "input", "id", r2),
            a,
            f"/v1/runs/{r2}",
            prompt,
        ),
        (
            "run input to the output column of the same run",
            (a, "runs", "input", "id", r1),
            (a, "runs", "output", "id", r3),
            a,
            f"/v1/runs/{r3}",
            prompt,
        ),
        (
            "run input to a run of another tenant",
            (a, "runs", "input", "id", r1),
            (b, "runs", "input", "id", rb),
            b,
            f"/v1/runs/{rb}",
            prompt,
        ),
    ]
    for what, (st, table, col, kcol, key), (dt, dtable, dcol, dkcol, dkey), reader, path, plain in moves:
        stored = _raw.read_cell(t, st.id, table, col, kcol, key)
        check(
            stored is not None and _decrypts(t.backend, st.id, f"{table}.{col}", key, stored) is not None,
            f"{what}: the source is not a ciphertext of its own row: {stored!r}",
        )
        assert stored is not None
        _raw.write_cell(t, dt.id, dtable, dcol, dkcol, dkey, stored)
        r: Answer = t.client.get(path, headers=reader.h)
        ok = r.status_code == 500 and r.json().get("error", {}).get("code") == "decryption_failed"
        check(ok, f"{what}: expected 500 decryption_failed, got {r.status_code} {r.text[:300]}")
        check(plain not in r.text, f"{what}: the answer shows the plaintext")
    # The originals still decrypt where they belong.
    r = t.get_memory(a, k1)
    check(
        r.status_code == 200 and r.json()["value"] == secret, f"original memory value broken: {r.text[:300]}"
    )
    r = t.client.get(f"/v1/runs/{r1}", headers=a.h)
    check(r.status_code == 200 and r.json()["input"] == prompt, f"original run broken: {r.text[:300]}")


def foreign_ids_like_missing(t: Target, _: SuiteEnv) -> None:
    """Every tenant route given another tenant's agent id, run id or memory key answers
    exactly like one given a missing id (status and body, modulo the id), and changes
    nothing of the owner (the same property the state machine samples, here each case)."""
    a, b = t.new_tenant("foreign-a"), t.new_tenant("foreign-b")
    sa = _seed(t, a)
    foreign = {"agent": sa["agent_id"], "run": sa["run_id"], "memory": sa["key"]}
    for kind, method, template, body in PROBES:
        missing = {"agent": new_id("ag"), "run": new_id("run")}.get(kind) or t.markers.atom()
        x: Answer = t.client.request(method, template.format(id=foreign[kind]), json=body, headers=b.h)
        y: Answer = t.client.request(method, template.format(id=missing), json=body, headers=b.h)
        what = f"{method} {template} with another tenant's {kind}"
        expected = 200 if "?agent_id" in template else 404
        check(
            x.status_code == expected, f"{what} answered {x.status_code}, expected {expected}: {x.text[:300]}"
        )
        check(
            (x.status_code, x.text.replace(foreign[kind], "<ID>"))
            == (y.status_code, y.text.replace(missing, "<ID>")),
            f"{what} answered {x.status_code} {x.text[:200]!r}, "
            f"a missing one {y.status_code} {y.text[:200]!r}",
        )
    r: Answer = t.client.get(f"/v1/agents/{sa['agent_id']}", headers=a.h)
    check(
        r.status_code == 200 and r.json()["instructions"] == sa["instructions"],
        f"owner's agent: {r.text[:300]}",
    )
    r = t.client.get(f"/v1/runs/{sa['run_id']}", headers=a.h)
    check(r.status_code == 200 and r.json()["input"].startswith(sa["prompt"]), f"owner's run: {r.text[:300]}")
    r = t.get_memory(a, sa["key"])
    check(r.status_code == 200 and r.json()["value"] == sa["value"], f"owner's memory: {r.text[:300]}")
    r = t.client.get("/v1/runs", headers=a.h)
    check([x["id"] for x in r.json()] == [sa["run_id"]], f"owner's runs after the probes: {r.text[:300]}")


# -- deletion -----------------------------------------------------------------------------------


def delete_shreds_and_purges(t: Target, _: SuiteEnv) -> None:
    """After deletion nothing of the tenant decrypts (its DEK is destroyed, also for a
    backend that never cached it) or is found (no row with its id in any table of any
    schema or database, its schema/database/file gone), its key is refused, the
    neighbour is intact, and a tenant re-created under the same name sees nothing."""
    a, b = t.new_tenant("del-a"), t.new_tenant("del-b")
    sa, sb = _seed(t, a), _seed(t, b)
    sealed_value = _raw.read_cell(t, a.id, "memory", "value", "key", sa["key"])
    sealed_input = _raw.read_cell(t, a.id, "runs", "input", "id", sa["run_id"])
    before = _raw.count_tenant_rows(t, a.id)
    for table in ("agents", "memory", "runs", "tenant_keys"):
        n = sum(v for k, v in before.items() if k.endswith(("." + table, ":" + table)))
        check(
            n > 0, f"before deletion no {table} row of the tenant was found: the row count cannot be trusted"
        )
    t.delete_tenant(a.id)

    err = _raises(lambda: t.backend.keyring.current_key(a.id), TenantKeysDestroyed)
    check(
        isinstance(err, TenantKeysDestroyed), "the server's keyring still gives a DEK of the deleted tenant"
    )
    fresh = t.open_separate_backend()
    try:
        err = _raises(lambda: fresh.keyring.current_key(a.id), TenantKeysDestroyed)
        check(isinstance(err, TenantKeysDestroyed), "a fresh backend still gives a DEK of the deleted tenant")
        for table, record, sealed in (
            ("memory.value", sa["key"], sealed_value),
            ("runs.input", sa["run_id"], sealed_input),
        ):
            check(
                sealed is not None and _decrypts(fresh, a.id, table, record, sealed) is None,
                f"a ciphertext ({table}) saved before the deletion still decrypts",
            )
    finally:
        fresh.close()

    left = {k: v for k, v in _raw.count_tenant_rows(t, a.id).items() if v}
    check(not left, f"rows or storage of the deleted tenant remain: {left}")
    # Nothing of it anywhere: SQLite file bytes (secure delete, WAL truncated); on
    # PostgreSQL every live row of every table, including ones without a tenant_id column.
    raw = _raw.stored_bytes(t)
    stale = [k for k in ("agent_name", "instructions", "key", "agent_id", "run_id") if sa[k].encode() in raw]
    check(not stale, f"the deleted tenant's {stale} are still in the stored data")
    r: Answer = t.client.get("/v1/me", headers=a.h)
    check(r.status_code == 401, f"the deleted tenant's key answered {r.status_code}, not 401")

    # The neighbour is untouched.
    r = t.get_memory(b, sb["key"])
    check(r.status_code == 200 and r.json()["value"] == sb["value"], f"neighbour's memory: {r.text[:300]}")
    r = t.client.get("/v1/agents", headers=b.h)
    check([x["id"] for x in r.json()] == [sb["agent_id"]], f"neighbour's agents: {r.text[:300]}")

    # Same name again: a new tenant that sees nothing of the old one.
    a2 = t.new_tenant("del-a", name=a.name)
    check(a2.id != a.id, "the re-created tenant got the deleted tenant's id")
    for path in ("/v1/agents", "/v1/memory", "/v1/runs"):
        r = t.client.get(path, headers=a2.h)
        check(r.status_code == 200 and r.json() == [], f"re-created tenant: GET {path} = {r.text[:300]}")
    r = t.client.get("/v1/usage?since=2000-01-01T00:00:00Z", headers=a2.h)
    check(r.status_code == 200 and r.json()["records"] == [], f"re-created tenant's usage: {r.text[:300]}")
    for path, missing in (
        (f"/v1/memory/{sa['key']}", f"/v1/memory/{t.markers.atom()}"),
        (f"/v1/agents/{sa['agent_id']}", f"/v1/agents/{new_id('ag')}"),
        (f"/v1/runs/{sa['run_id']}", f"/v1/runs/{new_id('run')}"),
    ):
        old, new = t.client.get(path, headers=a2.h), t.client.get(missing, headers=a2.h)
        same = old.text.replace(path.rsplit("/", 1)[1], "X") == new.text.replace(
            missing.rsplit("/", 1)[1], "X"
        )
        check(
            old.status_code == 404 and same,
            f"re-created tenant: GET {path} = {old.status_code} {old.text[:200]}",
        )
    r = t.client.get("/v1/audit?limit=1000", headers=a2.h)
    old_things = set(sa.values()) | {a.id, a.key_id}
    seen = (set(t.markers.atom_re.findall(r.text)) | set(ID_RE.findall(r.text))) & old_things
    check(not seen, f"the re-created tenant's audit shows the deleted tenant's {sorted(seen)}")


def delete_with_runs_in_flight(t: Target, _: SuiteEnv) -> None:
    """Deleting a tenant while its async runs are still waiting on the model leaves
    nothing behind: no run, usage, audit or memory row is written after the purge by the
    runs finishing late, no new DEK is made for it, and a neighbour's runs queued beside
    them all finish normally."""
    a, b = t.new_tenant("inflight-a"), t.new_tenant("inflight-b")
    agents = {}
    for x in (a, b):
        key = t.markers.atom()
        t.put_memory(x, key, t.markers.atom())
        body = {"name": "slow", "model": "simulated:ttft_ms=150,tpot_ms=1", "tools": ["memory_get"]}
        r: Answer = t.client.post("/v1/agents", json=body, headers=x.h)
        check(r.status_code == 201, f"create slow agent: {r.status_code} {r.text[:300]}")
        agents[x.id] = (r.json()["id"], key)
    neighbour_runs = []
    for _attempt in range(3):
        for x in (a, b):
            aid, key = agents[x.id]
            run = {
                "input": f"{t.markers.atom()}\n{memory_get_call(key)}",
                "mode": "async",
                "output_tokens": 4,
            }
            r = t.client.post(f"/v1/agents/{aid}/runs", json=run, headers=x.h)
            check(r.status_code == 202, f"async run: {r.status_code} {r.text[:300]}")
            if x is b:
                neighbour_runs.append(r.json()["id"])
    t.delete_tenant(a.id)
    # The neighbour's runs, queued between the deleted tenant's, show when those would
    # have finished too.
    deadline = time.monotonic() + _TIMEOUT_S
    pending = list(neighbour_runs)
    while pending:
        r = t.client.get(f"/v1/runs/{pending[0]}", headers=b.h)
        check(r.status_code == 200, f"neighbour's run: {r.status_code} {r.text[:300]}")
        if r.json()["status"] in ("succeeded", "failed"):
            check(r.json()["status"] == "succeeded", f"a neighbour's run failed: {r.json().get('error')}")
            pending.pop(0)
        else:
            check(time.monotonic() < deadline, "the neighbour's async runs did not finish")
            time.sleep(0.02)
    # ...plus one tenant-watch interval (1 s: a run that missed the deletion event is
    # stopped within it) for anything that would still land late.
    time.sleep(1.2)
    left = {k: v for k, v in _raw.count_tenant_rows(t, a.id).items() if v}
    check(not left, f"rows written after the deletion by runs in flight: {left}")
    check(_raw.dek_rows(t, a.id) == 0, "a DEK exists for the deleted tenant after its runs finished")


# -- tenant context across threads and processes -------------------------------------------------


def _ctx_pair(t: Target, key: str) -> tuple[TenantHandle, TenantHandle, dict[str, str]]:
    a, b = t.new_tenant("ctx-a"), t.new_tenant("ctx-b")
    values = {a.id: t.markers.atom(), b.id: t.markers.atom()}
    t.put_memory(a, key, values[a.id])
    t.put_memory(b, key, values[b.id])
    return a, b, values


_Seen = tuple[str, str | None, int]  # tenant id, its memory value, thread id


class _ThreadProbe:
    """Reads the current tenant's ``key`` in whatever thread it runs, and judges results."""

    def __init__(self, t: Target, key: str, values: dict[str, str]) -> None:
        self.t, self.key, self.values = t, key, values

    def read(self) -> _Seen:
        tid = current_tenant().tenant_id
        return tid, self.t.backend.tenant_store().memory_get(self.key), threading.get_ident()

    def scoped_read(self, ctx: TenantContext) -> _Seen:
        with tenant_scope(ctx):
            return self.read()

    @staticmethod
    def outcome(fn: Callable[[], _Seen], what: str) -> _Seen | None:
        """The task's result, or None when it failed closed (TenantContextMissing)."""
        try:
            return fn()
        except TenantContextMissing:
            return None
        except Exception as err:
            raise ConformanceFailure(f"{what}: {err!r}") from err

    def right(
        self, fn: Callable[[], _Seen], tenant: TenantHandle, what: str, *, may_fail: bool = False
    ) -> _Seen:
        """The task ran for ``tenant`` (or, if ``may_fail``, failed closed)."""
        got = self.outcome(fn, what)
        if got is None:
            check(may_fail, f"{what}: failed with TenantContextMissing")
            return (tenant.id, self.values[tenant.id], 0)
        check(got[:2] == (tenant.id, self.values[tenant.id]), f"{what}: got {got[:2]}, expected {tenant.id}")
        return got

    def fails(self, fn: Callable[[], _Seen], what: str) -> None:
        """The task, submitted with no tenant, failed closed."""
        got = self.outcome(fn, what)
        check(got is None, f"{what}: ran for tenant {got[0] if got else ''} instead of failing closed")


def thread_pool_context(t: Target, _: SuiteEnv) -> None:
    """Work handed to threads gets exactly the submitter's tenant or fails closed: never no
    tenant turned into "all", never the tenant of the previous task on a reused thread."""
    a, b, values = _ctx_pair(t, "ctx-probe")
    p = _ThreadProbe(t, "ctx-probe", values)
    ca, cb = t.context(a), t.context(b)
    with TenantThreadPoolExecutor(max_workers=1) as pool:
        with tenant_scope(ca):
            ra = p.right(lambda: pool.submit(p.read).result(_TIMEOUT_S), a, "TenantThreadPoolExecutor, A")
        with tenant_scope(cb):
            rb = p.right(lambda: pool.submit(p.read).result(_TIMEOUT_S), b, "the same worker thread, B")
        check(ra[2] == rb[2], "the pool of one thread used two threads")
        p.fails(lambda: pool.submit(p.read).result(_TIMEOUT_S), "TenantThreadPoolExecutor, no tenant")
    _interleaved(p, {a.id: ca, b.id: cb})
    # A plain pool does not carry the context: its task gets the submitter's tenant or
    # fails closed; a scope entered inside a task must not outlive that task.
    with ThreadPoolExecutor(max_workers=1) as plain:
        with tenant_scope(ca):
            p.right(lambda: plain.submit(p.read).result(_TIMEOUT_S), a, "plain thread pool", may_fail=True)
            p.right(lambda: run_in_thread(plain, p.read).result(_TIMEOUT_S), a, "run_in_thread")
        p.right(lambda: plain.submit(p.scoped_read, cb).result(_TIMEOUT_S), b, "a scope inside a task")
        p.fails(lambda: plain.submit(p.read).result(_TIMEOUT_S), "the next task on that thread, no tenant")


def _interleaved(p: _ThreadProbe, contexts: dict[str, TenantContext]) -> None:
    """Forced interleaving: two submitters, each in its own tenant scope, released together,
    share two worker threads; every task must see its own submitter's tenant."""
    errors: list[str] = []
    start = threading.Barrier(len(contexts))
    with TenantThreadPoolExecutor(max_workers=2) as pool:

        def submitter(ctx: TenantContext) -> None:
            tid = ctx.tenant_id
            try:
                with tenant_scope(ctx):
                    start.wait(_TIMEOUT_S)
                    futures = [pool.submit(p.read) for _ in range(20)]
                    for f in futures:
                        got = f.result(_TIMEOUT_S)
                        if got[:2] != (tid, p.values[tid]):
                            errors.append(f"a task of {tid} saw {got[:2]}")
            except Exception as err:
                errors.append(f"a task of {tid} raised {err!r}")

        threads = [threading.Thread(target=submitter, args=(c,)) for c in contexts.values()]
        for th in threads:
            th.start()
        for th in threads:
            th.join(_TIMEOUT_S)
    check(not errors, f"interleaved submitters: {errors[:3]}")


def worker_process_context(t: Target, env: SuiteEnv) -> None:
    """A worker process (spawned) sent ``ctx.to_wire()`` reads exactly that tenant's data,
    through its own backend; a task sent no context fails with TenantContextMissing, also
    on a worker that just served a tenant."""
    key = "ctx-probe"
    a, b, values = _ctx_pair(t, key)
    only_b = t.markers.atom()
    t.put_memory(b, only_b, t.markers.atom())
    spec = t.worker_spec()
    pool = env.process_pool()
    try:
        results = []
        for tenant in (a, b):
            wire = t.context(tenant).to_wire()
            got = pool.submit(_worker.read_memory, spec, wire, key).result(_TIMEOUT_S)
            results.append(got)
            want = {
                "before": None,
                "explicit": values[tenant.id],
                "scoped": values[tenant.id],
                "scoped_tenant": tenant.id,
                "after": None,
            }
            check(
                {k: got[k] for k in want} == want, f"worker process for {tenant.id}: {got}, expected {want}"
            )
            none = pool.submit(_worker.read_without_context, spec, key).result(_TIMEOUT_S)
            results.append(none)
            check(
                none["outcome"] == "TenantContextMissing" and none["tenant"] is None,
                f"worker process with no context after serving {tenant.id}: {none}",
            )
        got = pool.submit(_worker.read_memory, spec, t.context(a).to_wire(), only_b).result(_TIMEOUT_S)
        check(got["explicit"] is None and got["scoped"] is None, f"tenant A read B's key in a worker: {got}")
        check(len({r["pid"] for r in results}) == 1, "the worker tasks did not share one reused process")
    finally:
        pool.submit(_worker.close_all).result(_TIMEOUT_S)


# -- shared "cache key material" and first-DEK race --------------------------------------------------


def same_cache_key_material(t: Target, _: SuiteEnv) -> None:
    """Two tenants store the same key with the same value, define the same agent and ask
    the same question: each gets only its own answers, before and after one changes."""
    a, b = t.new_tenant("same-a"), t.new_tenant("same-b")
    key, value = "cache-question", "same-answer-material"
    for x in (a, b):
        t.put_memory(x, key, value)
    sealed = [_raw.read_cell(t, x.id, "memory", "value", "key", key) for x in (a, b)]
    check(sealed[0] != sealed[1], "the same value of two tenants is stored as the same ciphertext")
    agents = {x.id: t.new_agent(x, "answerer", "answer from memory") for x in (a, b)}
    question = "what is the answer\n" + memory_get_call(key)
    runs: dict[str, list[str]] = {a.id: [], b.id: []}

    def ask(x: TenantHandle, expected: str, not_expected: str | None = None) -> None:
        run = t.run(x, agents[x.id], question)
        runs[x.id].append(str(run["id"]))
        out = str(run["output"])
        check(expected in out, f"{x.id} asked and got {out!r}, expected its own {expected!r}")
        check(
            not_expected is None or not_expected not in out, f"{x.id} got the other tenant's answer: {out!r}"
        )

    def value_of(x: TenantHandle) -> Any:
        r = t.get_memory(x, key)
        return r.json()["value"] if r.status_code == 200 else r.status_code

    ask(a, value)
    ask(b, value)
    va = t.markers.atom()
    t.put_memory(a, key, va)
    check(value_of(b) == value and value_of(a) == va, "one tenant's write changed the other's value")
    ask(a, va)
    ask(b, value, va)
    vb = t.markers.atom()
    t.put_memory(b, key, vb)
    ask(a, va, vb)
    ask(b, vb, va)
    check(t.client.delete(f"/v1/memory/{key}", headers=a.h).status_code == 204, "delete failed")
    check(value_of(a) == 404 and value_of(b) == vb, "one tenant's delete changed the other's value")
    for x in (a, b):
        listed: Answer = t.client.get("/v1/runs", headers=x.h)
        check(listed.status_code == 200, f"runs of {x.id}: {listed.status_code} {listed.text[:300]}")
        got = sorted(r["id"] for r in listed.json())
        check(got == sorted(runs[x.id]), f"runs of {x.id}: {got}, expected {sorted(runs[x.id])}")
    new_instructions = t.markers.atom()
    r = t.client.patch(f"/v1/agents/{agents[a.id]}", json={"instructions": new_instructions}, headers=a.h)
    check(r.status_code == 200, f"patch agent: {r.status_code}")
    r = t.client.get(f"/v1/agents/{agents[b.id]}", headers=b.h)
    check(
        r.json()["instructions"] == "answer from memory", f"the other tenant's agent changed: {r.text[:300]}"
    )


def first_dek_race(t: Target, _: SuiteEnv) -> None:
    """Eight writers, each with its own backend (as separate server processes have), make
    the first encrypted writes of a brand-new tenant at once: one DEK row results and every
    row is readable by every writer and through the API."""
    a = t.new_tenant("race")
    check(_raw.dek_rows(t, a.id) == 0, "a brand-new tenant already has a DEK: the race cannot be staged")
    ctx = t.context(a)
    n = 8
    values = [t.markers.atom() for _ in range(n)]
    backends = [t.open_separate_backend() for _ in range(n)]
    try:
        barrier = threading.Barrier(n)
        errors: list[BaseException] = []

        def write(i: int) -> None:
            try:
                store = backends[i].tenant_store(ctx)
                barrier.wait(_TIMEOUT_S)
                store.memory_put(f"race-{i}", values[i])
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(_TIMEOUT_S)
        check(not errors, f"concurrent first writes failed: {[repr(e) for e in errors[:3]]}")
        check(_raw.dek_rows(t, a.id) == 1, f"{_raw.dek_rows(t, a.id)} DEK rows after the race, expected 1")
        for j, backend in enumerate(backends):
            store = backend.tenant_store(ctx)
            for i in range(n):
                try:
                    got = store.memory_get(f"race-{i}")
                except PatinoxError as err:
                    raise ConformanceFailure(
                        f"writer {j} cannot read the row of writer {i}: {err!r}"
                    ) from err
                check(got == values[i], f"writer {j} reads {got!r} for the row of writer {i}")
    finally:
        for backend in backends:
            backend.close()
    for i in range(n):
        r = t.get_memory(a, f"race-{i}")
        check(
            r.status_code == 200 and r.json()["value"] == values[i],
            f"race-{i} through the API: {r.text[:300]}",
        )


# -- PostgreSQL: pooled connections and row-level security -------------------------------------------


def pool_of_one_connection(t: Target, _: SuiteEnv) -> None:
    """One pooled connection, two tenants alternating: each sees only its own rows, and
    between transactions the connection carries no tenant setting (also after a failed
    transaction), so a forgotten setting can never serve the next tenant."""
    from patinox.storage import Placements

    assert t.pg is not None and t.owner_url is not None
    small = create_engine(normalise_url(t.app_url), pool_size=1, max_overflow=0)
    owner = create_engine(normalise_url(t.owner_url), pool_size=1, max_overflow=0)
    placements = Placements(
        app_url=t.app_url, owner_url=t.owner_url, app_role=t.pg.app_role, main=small, owner=owner
    )
    backend = SqlBackend(small, placements=placements, key_provider=key_provider_from_url(t.kek_url))
    try:
        _alternate(t, backend)
    finally:
        backend.close()
    # The server's own pool, after every request so far, holds no tenant either.
    with t.backend.engine.connect() as conn:
        left = conn.execute(text("SELECT current_setting('patinox.tenant_id', true)")).scalar()
        check(left in (None, ""), f"a pooled connection of the server carries tenant setting {left!r}")


def _alternate(t: Target, backend: SqlBackend) -> None:
    a, b = t.new_tenant("one-a"), t.new_tenant("one-b")
    model = StorageModel(t.storage_model)
    stores = {x.id: backend.tenant_store(t.context(x)) for x in (a, b)}
    keys: dict[str, list[str]] = {a.id: [], b.id: []}
    tables = [_raw.location(t, x.id).table("memory") for x in (a, b)]
    pids: set[int] = set()
    for i in range(8):
        for x, other in ((a, b), (b, a)):
            key = f"k{i}-{t.markers.atom()}"
            stores[x.id].memory_put(key, t.markers.atom())
            keys[x.id].append(key)
            got = stores[other.id].memory_list(limit=1000)
            check(sorted(got) == sorted(keys[other.id]), f"{model.value} store of one tenant listed {got}")
            check(
                _raises(stores[x.id].memory_delete, NotFound, args=("no-such-key",)) is not None,
                "deleting a missing key did not fail",
            )
            with backend.engine.connect() as conn:
                pids.add(int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()))
                for name in ("patinox.tenant_id", "patinox.scope"):
                    left = conn.execute(text(f"SELECT current_setting('{name}', true)")).scalar()
                    check(
                        left in (None, ""), f"after a transaction the pooled connection keeps {name}={left!r}"
                    )
                for table in tables:
                    n = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                    check(n == 0, f"with no setting the pooled connection sees {n} rows of {table}")
                conn.rollback()
    check(len(pids) == 1, f"the pool of one used {len(pids)} connections")


def rls_as_app_role(t: Target, _: SuiteEnv) -> None:
    """Connected as the application role: it is no superuser, has no BYPASSRLS and owns
    nothing; every table with a ``tenant_id`` column, in every schema and database, has
    forced row-level security with a policy; with no tenant setting it sees no row, with
    another tenant's setting it can neither read nor write the tenant's rows; every view
    is ``security_invoker``; no materialized view or SECURITY DEFINER function exists."""
    assert t.pg is not None
    _raw.require_rls_bypass(t)
    a, b = t.new_tenant("rls-a"), t.new_tenant("rls-b")
    _seed(t, a)
    _seed(t, b)
    with t.backend.engine.connect() as conn:
        user, sup, bypass = conn.execute(
            text("SELECT current_user, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        ).one()
        check(
            user == t.pg.app_role, f"the server connects as {user}, not the application role {t.pg.app_role}"
        )
        check(not sup and not bypass, f"the application role has SUPERUSER={sup} BYPASSRLS={bypass}")
    for db in _raw.pg_databases(t):
        with _raw.admin(t, db) as conn:
            _catalog_checks(conn, db, t.pg.app_role)
        _app_role_checks(t, db, a, b)


def _catalog_checks(conn: Connection, db: str, app_role: str) -> None:
    sys = ["pg_catalog", "information_schema", "pg_toast"]
    owned = conn.execute(
        text(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = :r AND c.relnamespace::regnamespace::text <> ALL(:sys)"
        ),
        {"r": app_role, "sys": sys},
    ).scalar_one()
    check(owned == 0, f"{db}: the application role owns {owned} relations")
    rows = conn.execute(
        text(
            "SELECT n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity, "
            "(SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname <> ALL(:sys) AND EXISTS ("
            "SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' "
            "AND NOT a.attisdropped)"
        ),
        {"sys": sys},
    ).all()
    check(rows, f"{db}: no table with a tenant_id column found")
    weak = [f"{s}.{n}" for s, n, rls, forced, policies in rows if not (rls and forced and policies)]
    check(not weak, f"{db}: tables without forced row-level security and a policy: {weak}")
    views = conn.execute(
        text(
            "SELECT n.nspname || '.' || c.relname, c.relkind, coalesce(c.reloptions, '{}') "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('v', 'm') AND n.nspname <> ALL(:sys)"
        ),
        {"sys": sys},
    ).all()
    bad = [
        name
        for name, kind, opts in views
        if kind == "m" or not set(opts) & {"security_invoker=true", "security_invoker=on"}
    ]
    check(not bad, f"{db}: views that run with their owner's rights (or materialized views): {bad}")
    definers = (
        conn.execute(
            text(
                "SELECT n.nspname || '.' || p.proname FROM pg_proc p "
                "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.prosecdef AND n.nspname <> ALL(:sys)"
            ),
            {"sys": sys},
        )
        .scalars()
        .all()
    )
    check(not definers, f"{db}: SECURITY DEFINER functions (they bypass the caller's RLS): {definers}")


def _app_role_checks(t: Target, db: str, a: TenantHandle, b: TenantHandle) -> None:
    assert t.pg is not None
    with _raw.admin(t, db) as conn:
        tables = [
            (str(s), str(n))
            for s, n in conn.execute(
                text(
                    "SELECT table_schema, table_name FROM information_schema.columns "
                    "WHERE column_name = 'tenant_id' "
                    "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
                )
            )
        ]
        total = {
            (s, n): int(conn.execute(text(f'SELECT count(*) FROM "{s}"."{n}"')).scalar_one())
            for s, n in tables
        }
    engine = create_engine(normalise_url(with_database(t.pg.app_url, db)))
    try:
        with engine.begin() as conn:
            for (s, n), rows in total.items():
                seen = conn.execute(text(f'SELECT count(*) FROM "{s}"."{n}"')).scalar_one()
                check(
                    seen == 0,
                    f"{db}: with no setting the application role sees {seen} of {rows} rows of {s}.{n}",
                )
        loc = _raw.location(t, a.id)
        if loc.pg_database != db:
            return
        memory = loc.table("memory")
        with engine.connect() as conn:
            conn.execute(text("SELECT set_config('patinox.tenant_id', :t, true)"), {"t": b.id})
            seen = conn.execute(
                text(f"SELECT count(*) FROM {memory} WHERE tenant_id = :a"), {"a": a.id}
            ).scalar_one()
            check(
                seen == 0, f"{db}: with tenant B's setting the application role sees {seen} memory rows of A"
            )
            changed = conn.execute(
                text(f"UPDATE {memory} SET value = 'x' WHERE tenant_id = :a"), {"a": a.id}
            ).rowcount
            check(
                changed == 0,
                f"{db}: with tenant B's setting the application role changed {changed} rows of A",
            )
            insert = text(
                f"INSERT INTO {memory} (tenant_id, key, value, updated_at) VALUES (:a, 'x', 'y', now())"
            )
            err = _raises(conn.execute, Exception, args=(insert, {"a": a.id}))
            check(
                err is not None and "row-level security" in str(err),
                f"{db}: with tenant B's setting the application role could insert a row for A ({err})",
            )
            conn.rollback()
    finally:
        engine.dispose()
