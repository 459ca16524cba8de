"""The tenant-fair event loop: ready callbacks by tenant in weighted turns, each tenant's in
order, the system's alternating with the tenants'; a light tenant's task is not held behind
a heavy neighbour's hundreds."""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable

import pytest

from patinox.limits import fair_loop
from patinox.limits.fair_loop import FairReadyQueue, flow_scope
from patinox.tenancy import TenantContext, tenant_scope
from tests._contexts import tenant_context


def ctx(tenant_id: str, plan: str = "pro") -> TenantContext:
    return tenant_context(tenant_id, plan=plan)


class _Constructing:
    """What a handle asks of its loop when made outside one."""

    def get_debug(self) -> bool:
        return False


_LOOP: asyncio.AbstractEventLoop = _Constructing()  # type: ignore[assignment]


def handle(
    label: str, tenant: TenantContext | None, log: list[str], flow: str | None = None
) -> asyncio.Handle:
    """A handle whose context holds ``tenant`` (or the flow ``flow``), as the loop would make."""

    def make() -> contextvars.Context:
        if flow is not None:
            with flow_scope(flow):
                return contextvars.copy_context()
        if tenant is None:
            return contextvars.copy_context()
        with tenant_scope(tenant):
            return contextvars.copy_context()

    context = contextvars.Context().run(make)
    return asyncio.Handle(log.append, (label,), loop=_LOOP, context=context)


def drain(queue: FairReadyQueue) -> list[str]:
    out: list[str] = []
    while queue:
        h = queue.popleft()
        out.append(h._args[0])
    return out


def test_tenants_take_turns_by_plan_weight_and_each_keeps_its_order() -> None:
    log: list[str] = []
    q = FairReadyQueue()
    a, b = ctx("tn_a", "pro"), ctx("tn_b", "free")  # weights 4 and 1
    for i in range(8):
        q.append(handle(f"a{i}", a, log))
    for i in range(3):
        q.append(handle(f"b{i}", b, log))
    assert len(q) == q.size == 11
    order = drain(q)
    # b arrived with nothing queued: it goes first (sparse), then the turns go on.
    assert order == ["b0", "a0", "a1", "a2", "a3", "b1", "a4", "a5", "a6", "a7", "b2"]
    assert len(q) == 0 and not q
    with pytest.raises(IndexError):
        q.popleft()


def test_system_callbacks_alternate_with_the_tenants_and_a_named_flow_is_its_own() -> None:
    log: list[str] = []
    q = FairReadyQueue()
    a = ctx("tn_a", "enterprise")  # weight 16: one turn covers all of its callbacks here
    for i in range(4):
        q.append(handle(f"a{i}", a, log))
    for i in range(3):
        q.append(handle(f"s{i}", None, log))
    q.append(handle("p0", None, log, flow="lag-probe"))
    assert q.flows() == {"system": 3, "tn_a": 4, "flow:lag-probe": 1}
    assert drain(q) == ["s0", "p0", "s1", "a0", "s2", "a1", "a2", "a3"]  # p0: sparse, first


def test_clear_empties_every_flow() -> None:
    log: list[str] = []
    q = FairReadyQueue()
    q.append(handle("a", ctx("tn_a"), log))
    q.append(handle("s", None, log))
    q.clear()
    assert q.size == 0 and q.flows() == {"system": 0}


def test_one_pass_runs_at_most_a_batch_so_timers_and_sockets_are_polled_between() -> None:
    log: list[str] = []
    q = FairReadyQueue()
    a = ctx("tn_a")
    for i in range(fair_loop.BATCH + 8):
        q.append(handle(f"a{i}", a, log))
    assert q.size == fair_loop.BATCH + 8 and len(q) == fair_loop.BATCH


def _timer_waits(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> int:
    """Most steps the heavy tenant's 300 tasks took between a timer of the light tenant
    falling due (``call_later(0)``) and its callback running, over 20 timers."""
    heavy_steps = 0

    async def heavy_task(stop: asyncio.Event) -> None:
        nonlocal heavy_steps
        while not stop.is_set():
            heavy_steps += 1
            await asyncio.sleep(0)

    async def light_task() -> int:
        loop = asyncio.get_running_loop()
        worst = 0
        for _ in range(20):
            fired = loop.create_future()
            at = heavy_steps
            loop.call_later(0, lambda f=fired: f.done() or f.set_result(heavy_steps))
            worst = max(worst, await fired - at)
        return worst

    async def main() -> int:
        stop = asyncio.Event()
        with tenant_scope(ctx("tn_heavy")):
            heavy = [asyncio.create_task(heavy_task(stop)) for _ in range(300)]
        await asyncio.sleep(0)
        with tenant_scope(ctx("tn_light")):
            worst = await asyncio.create_task(light_task())
        stop.set()
        await asyncio.gather(*heavy)
        return worst

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def test_a_light_tenants_timer_waits_a_batch_not_the_whole_backlog() -> None:
    # First come, first served, the timer joins the queue after the pass under way (up to
    # all 300 heavy steps) and then waits behind all of them again.
    assert _timer_waits(asyncio.new_event_loop) >= 300
    # Here: at most the rest of a pass (one batch), then one turn of the heavy tenant.
    assert _timer_waits(fair_loop.new_event_loop) <= fair_loop.BATCH + 8


def _light_waits(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> int:
    """Steps the heavy tenant's 200 tasks took while the light tenant's one task took 50."""
    heavy_steps = 0

    async def heavy_task() -> None:
        nonlocal heavy_steps
        for _ in range(200):
            heavy_steps += 1
            await asyncio.sleep(0)

    async def light_task() -> int:
        for _ in range(50):
            await asyncio.sleep(0)
        return heavy_steps

    async def main() -> int:
        with tenant_scope(ctx("tn_heavy")):
            heavy = [asyncio.create_task(heavy_task()) for _ in range(200)]
        await asyncio.sleep(0)  # the heavy tasks are all running before the light one starts
        with tenant_scope(ctx("tn_light")):
            light = asyncio.create_task(light_task())
        waited = await light
        await asyncio.gather(*heavy)
        return waited

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def test_a_light_tenant_is_not_held_behind_a_heavy_neighbours_hundreds_of_tasks() -> None:
    fifo = _light_waits(asyncio.new_event_loop)
    fair = _light_waits(fair_loop.new_event_loop)
    # First come, first served: each of the light task's steps waits for one step of each
    # of the 200 heavy tasks. In turns: for at most one turn of the heavy tenant (4 steps,
    # pro), however many tasks it has.
    assert fifo >= 50 * 200 - 200
    assert fair <= 50 * 4 + 4


def test_install_takes_only_an_unused_stock_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert fair_loop.describe(loop) == "fifo"
        loop.call_soon(lambda: None)  # already has a callback queued: left alone
        assert fair_loop.install(loop) is False and fair_loop.describe(loop) == "fifo"
    finally:
        loop.close()
    loop = fair_loop.new_event_loop()
    try:
        assert fair_loop.describe(loop) == "tenant-fair" and fair_loop.install(loop) is True
        assert loop.run_until_complete(asyncio.sleep(0, result=7)) == 7
    finally:
        loop.close()

    class Foreign:  # a loop without CPython's ready deque (uvloop keeps its queue in C)
        pass

    assert fair_loop.install(Foreign()) is False  # type: ignore[arg-type]


def test_callbacks_from_other_threads_all_run_while_tenants_keep_the_loop_busy() -> None:
    """``call_soon_threadsafe`` (executor and ``to_thread`` completions) appends from other
    threads while the loop's thread takes callbacks: none is lost, none counted twice."""
    threads, each = 8, 3000
    ran = [0]

    def note() -> None:
        ran[0] += 1

    async def busy(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        with tenant_scope(ctx("tn_busy")):
            spinning = [asyncio.create_task(busy(stop)) for _ in range(50)]

        def hammer() -> None:
            for _ in range(each):
                loop.call_soon_threadsafe(note)

        await asyncio.gather(*(asyncio.to_thread(hammer) for _ in range(threads)))
        for _ in range(100):
            await asyncio.sleep(0)
        stop.set()
        await asyncio.gather(*spinning)
        return ran[0]

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads swap the GIL every few bytecodes: races show up
    try:
        with asyncio.Runner(loop_factory=fair_loop.new_event_loop) as runner:
            assert runner.run(main()) == threads * each
    finally:
        sys.setswitchinterval(switching)


def _spin_counts(tasks: dict[str, int], until: int) -> dict[str, int]:
    """Steps each tenant's spinning tasks (``tenant -> tasks``, each ``await sleep(0)`` in a
    loop) took on a tenant-fair loop until the first tenant's reached ``until``."""
    counts = dict.fromkeys(tasks, 0)

    async def spin(tenant: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            counts[tenant] += 1
            if counts[tenant] >= until:
                stop.set()
            await asyncio.sleep(0)

    async def main() -> None:
        stop = asyncio.Event()
        running = []
        for tenant, n in tasks.items():
            with tenant_scope(ctx(tenant)):
                running += [asyncio.create_task(spin(tenant, stop)) for _ in range(n)]
        await asyncio.gather(*running)

    with asyncio.Runner(loop_factory=fair_loop.new_event_loop) as runner:
        runner.run(main())
    return counts


def test_a_tenant_with_one_callback_ready_at_a_time_does_not_take_every_turn() -> None:
    """Emptied after each step, a flow keeps its place in the round: it is not new again
    (and first) until it was away a whole round."""
    counts = _spin_counts({"tn_one": 1, "tn_two": 2}, until=2000)
    assert counts["tn_two"] >= counts["tn_one"] // 2


def test_a_stream_of_new_tenants_does_not_stall_the_tenant_whose_turn_it_is() -> None:
    """A flow that arrives goes first, but the turns of the others keep what was left of
    them: two busy tenants are both served while a new one arrives every third callback."""
    log: list[str] = []
    q = FairReadyQueue()
    h, g = ctx("tn_h"), ctx("tn_g")
    for i in range(300):
        q.append(handle(f"h{i}", h, log))
        q.append(handle(f"g{i}", g, log))
    served: dict[str, int] = {"h": 0, "g": 0, "new": 0}
    for i in range(450):
        if i % 3 == 0:
            q.append(handle("n", ctx(f"tn_new{i}"), log))
        len(q)
        label = q.popleft()._args[0]
        served["new" if label == "n" else label[0]] += 1
    assert served["new"] == 150
    assert abs(served["h"] - served["g"]) <= 4  # one turn apart at most
