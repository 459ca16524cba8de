"""The tenant context crosses threads and processes exactly: work handed on gets its
submitter's tenant or fails closed, never no tenant, a default or the previous one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from patinox.conformance import _worker
from patinox.conformance._checks._common import TIMEOUT_S
from patinox.conformance._deployment import ConformanceFailure, SuiteEnv, Target, TenantHandle, check
from patinox.errors import TenantContextMissing
from patinox.tenancy import (
    TenantContext,
    TenantThreadPoolExecutor,
    current_tenant,
    run_in_thread,
    tenant_scope,
)


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
            ra = p.right(lambda: pool.submit(p.read).result(TIMEOUT_S), a, "TenantThreadPoolExecutor, A")
        with tenant_scope(cb):
            rb = p.right(lambda: pool.submit(p.read).result(TIMEOUT_S), b, "the same worker thread, B")
        check(ra[2] == rb[2], "the pool of one thread used two threads")
        p.fails(lambda: pool.submit(p.read).result(TIMEOUT_S), "TenantThreadPoolExecutor, no tenant")
    _interleaved(p, {a.id: ca, b.id: cb})
    # A plain pool does not carry the context: its task gets the submitter's tenant or
    # fails closed; a scope entered inside a task must not outlive that task.
    with ThreadPoolExecutor(max_workers=1) as plain:
        with tenant_scope(ca):
            p.right(lambda: plain.submit(p.read).result(TIMEOUT_S), a, "plain thread pool", may_fail=True)
            p.right(lambda: run_in_thread(plain, p.read).result(TIMEOUT_S), a, "run_in_thread")
        p.right(lambda: plain.submit(p.scoped_read, cb).result(TIMEOUT_S), b, "a scope inside a task")
        p.fails(lambda: plain.submit(p.read).result(TIMEOUT_S), "the next task on that thread, no tenant")


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
                    start.wait(TIMEOUT_S)
                    futures = [pool.submit(p.read) for _ in range(20)]
                    for f in futures:
                        got = f.result(TIMEOUT_S)
                        if got[:2] != (tid, p.values[tid]):
                            errors.append(f"a task of {tid} saw {got[:2]}")
            except Exception as err:
                errors.append(f"a task of {tid} raised {err!r}")

        threads = [threading.Thread(target=submitter, args=(c,)) for c in contexts.values()]
        for th in threads:
            th.start()
        for th in threads:
            th.join(TIMEOUT_S)
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
            got = pool.submit(_worker.read_memory, spec, wire, key).result(TIMEOUT_S)
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
            none = pool.submit(_worker.read_without_context, spec, key).result(TIMEOUT_S)
            results.append(none)
            check(
                none["outcome"] == "TenantContextMissing" and none["tenant"] is None,
                f"worker process with no context after serving {tenant.id}: {none}",
            )
        got = pool.submit(_worker.read_memory, spec, t.context(a).to_wire(), only_b).result(TIMEOUT_S)
        check(got["explicit"] is None and got["scoped"] is None, f"tenant A read B's key in a worker: {got}")
        check(len({r["pid"] for r in results}) == 1, "the worker tasks did not share one reused process")
    finally:
        pool.submit(_worker.close_all).result(TIMEOUT_S)
