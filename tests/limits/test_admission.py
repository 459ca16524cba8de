"""The fair share of a process's capacity: admission by weighted max-min share of an
adaptive limit, bounded waits, and the limit following the event loop's lag."""

from __future__ import annotations

import asyncio
import time

import pytest

from patinox.errors import Overloaded
from patinox.limits import AdmissionSettings, FairShareAdmission


def fixed(limit: int, **kw: float) -> FairShareAdmission:
    """A controller whose limit stays at ``limit`` (no adjustment can move it)."""
    return FairShareAdmission(AdmissionSettings(initial_limit=limit, min_limit=limit, max_limit=limit, **kw))


async def waiting(adm: FairShareAdmission, tenant: str, weight: int = 1, **kw: float) -> asyncio.Task[None]:
    """A task waiting in ``adm`` for a run of ``tenant`` (asserted to be waiting)."""
    before = adm.snapshot()["waiting"]
    task = asyncio.create_task(adm.admit(tenant, weight, **kw))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()
    assert adm.snapshot()["waiting"] == before + 1
    return task


def test_below_the_limit_every_run_is_admitted_and_counted() -> None:
    adm = fixed(4)
    assert all(adm.try_admit(t, 1) for t in ("a", "a", "b"))
    assert adm.running == 3
    adm.release("a")
    adm.release("a")
    adm.release("b")
    assert adm.running == 0
    assert adm.snapshot()["tenants"] == 0  # nothing kept of a tenant with nothing running
    adm.release("b")  # a second release of the same run never drives the counts negative
    assert adm.running == 0


async def test_a_tenant_over_its_share_waits_while_a_newcomer_starts_at_once() -> None:
    adm = fixed(4, headroom=0.25)
    for _ in range(4):
        assert adm.try_admit("heavy", 1)  # borrowed: nobody else wanted the capacity
    assert not adm.try_admit("heavy", 1)
    task = await waiting(adm, "heavy")
    # The light tenant has no runs here, so it is under its share: admitted now, within
    # the headroom above the limit (runs cannot be pre-empted).
    assert adm.try_admit("light", 1)
    assert adm.running == 5
    # Beyond the headroom nobody starts, not even a tenant under its share.
    assert not adm.try_admit("third", 1)
    assert adm.claimable() is None
    adm.release("heavy")
    adm.release("heavy")
    await task  # a freed slot goes to the waiting run
    assert adm.running == 4
    task.cancel()


async def test_freed_slots_go_to_the_waiting_tenant_with_the_fewest_runs_per_weight() -> None:
    adm = fixed(4, headroom=0.01)
    for t in ("a", "a", "a", "b"):
        assert adm.try_admit(t, 1)
    granted: list[str] = []

    async def wait_for(t: str) -> None:
        await adm.admit(t, 1)
        granted.append(t)

    # "a" waits first, yet "b" runs fewer: "b" gets the next slot.
    first = asyncio.create_task(wait_for("a"))
    await asyncio.sleep(0)
    second = asyncio.create_task(wait_for("b"))
    await asyncio.sleep(0)
    adm.release("a")
    await asyncio.sleep(0)
    assert granted == ["b"]
    adm.release("a")
    await asyncio.gather(first, second)
    assert granted == ["b", "a"]


async def test_weights_decide_the_shares() -> None:
    adm = fixed(10, headroom=0.01)
    # "pro" (weight 4) holds 4 runs, "free" (weight 1) 6: over their shares of 8 and 2.
    for _ in range(4):
        assert adm.try_admit("pro", 4)
    for _ in range(6):
        assert adm.try_admit("free", 1)
    assert adm.claimable() == frozenset({"free"})  # only "pro" is under its share
    tasks = [asyncio.create_task(adm.admit("free", 1)), asyncio.create_task(adm.admit("pro", 4))]
    await asyncio.sleep(0)
    adm.release("free")
    await asyncio.sleep(0)
    assert tasks[1].done() and not tasks[0].done()  # the slot went to "pro"
    tasks[0].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_run_whose_turn_does_not_come_is_refused_overloaded_and_leaves_nothing() -> None:
    adm = fixed(2)
    assert adm.try_admit("heavy", 1) and adm.try_admit("heavy", 1)
    with pytest.raises(Overloaded) as err:
        await adm.admit("heavy", 1, max_wait_s=0.05)
    assert err.value.code == "overloaded" and err.value.http_status == 503
    fields = err.value.fields
    assert fields["tenant_id"] == "heavy"
    assert isinstance(fields["retry_after_s"], int) and fields["retry_after_s"] >= 1
    assert fields["limit"] == 2 and fields["running"] == 2
    assert adm.snapshot()["waiting"] == 0 and adm.refused == 1
    adm.release("heavy")
    adm.release("heavy")
    assert adm.running == 0 and adm.snapshot()["tenants"] == 0


async def test_a_waiter_that_goes_away_takes_no_slot_with_it() -> None:
    adm = fixed(1)
    assert adm.try_admit("a", 1)
    task = await waiting(adm, "a")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert adm.snapshot()["waiting"] == 0
    adm.release("a")
    assert adm.running == 0 and adm.snapshot()["tenants"] == 0


async def test_a_waiter_granted_and_cancelled_in_the_same_step_gives_its_slot_back() -> None:
    adm = fixed(1)
    assert adm.try_admit("a", 1)
    task = await waiting(adm, "a")
    adm.release("a")  # grants the slot to the waiter: running 1 again
    assert adm.running == 1
    task.cancel()  # ... which is cancelled before it could resume
    await asyncio.gather(task, return_exceptions=True)
    assert adm.running == 0 and adm.snapshot()["tenants"] == 0


def test_switched_off_it_admits_everything() -> None:
    adm = FairShareAdmission(AdmissionSettings(enabled=False, initial_limit=4, min_limit=4, max_limit=4))
    assert all(adm.try_admit("a", 1) for _ in range(100))
    assert adm.claimable() == frozenset()


def test_the_limit_falls_with_lag_and_rises_only_when_used() -> None:
    s = AdmissionSettings(initial_limit=32, min_limit=4, max_limit=64, target_lag_s=0.010)
    adm = FairShareAdmission(s)
    adm.adjust(0.050)
    assert 32 * 0.9 - 1 <= adm.limit < 32  # a bounded step down
    for _ in range(100):
        adm.adjust(0.050)
    assert adm.limit == 4  # never below the floor
    for _ in range(100):
        adm.adjust(0.001)  # the loop keeps up, but nothing uses the limit: it stays
    assert adm.limit == 4
    for _ in range(4):
        assert adm.try_admit("a", 1)  # the limit is in use
    for _ in range(100):
        adm.adjust(0.001)
        while adm.try_admit("a", 1):
            pass
    assert adm.limit == 64  # never above the ceiling


def test_at_its_target_lag_the_limit_holds() -> None:
    adm = FairShareAdmission(AdmissionSettings(initial_limit=20, target_lag_s=0.005))
    while adm.try_admit("a", 1):
        pass
    for _ in range(50):
        adm.adjust(0.005)
    assert adm.limit == 20


async def test_the_limit_follows_the_event_loops_real_lag() -> None:
    s = AdmissionSettings(initial_limit=16, min_limit=2, max_limit=200, target_lag_s=0.005, probe_s=0.005)
    adm = FairShareAdmission(s)
    watch = asyncio.create_task(adm.watch())
    stop = False

    async def hog() -> None:  # a run hogging the loop: 20 ms of CPU at a time
        while not stop:
            until = time.thread_time() + 0.02
            while time.thread_time() < until:
                pass
            await asyncio.sleep(0)

    hogs = asyncio.create_task(hog())
    async with asyncio.timeout(120):  # a guard against a hang, not a time limit on the result
        while adm.limit > 2:
            await asyncio.sleep(0.01)
        stop = True
        await hogs
        # Runs that only wait (on a model) cost the loop nothing: the limit grows while used.
        while adm.limit < 50:
            while adm.try_admit("a", 1):
                pass
            await asyncio.sleep(0.01)
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)


async def test_a_slot_is_released_however_its_block_ends() -> None:
    adm = fixed(1, max_wait_s=0.05)
    with pytest.raises(ZeroDivisionError):
        async with adm.slot("a", 1):
            assert adm.running == 1
            _ = 1 / 0
    assert adm.running == 0
    async with adm.slot("a", 1):
        with pytest.raises(Overloaded):
            async with adm.slot("a", 1):
                pytest.fail("admitted past the limit")  # pragma: no cover
        assert adm.running == 1
    assert adm.running == 0 and adm.snapshot()["tenants"] == 0


def test_a_lag_from_waiting_on_blocking_calls_does_not_shrink_the_limit() -> None:
    """A loop stalled on a database round trip (not on the CPU) is not relieved by admitting
    fewer runs: the limit falls only when the loop's thread was busy computing."""
    adm = FairShareAdmission(AdmissionSettings(initial_limit=32, min_limit=4, target_lag_s=0.005))
    for _ in range(20):
        adm.adjust(0.050, busy=0.3)
    assert adm.limit == 32
    adm.adjust(0.050, busy=0.95)
    assert adm.limit < 32


def test_storage_calls_waiting_for_a_thread_shrink_the_limit_whatever_the_loop_does() -> None:
    """On PostgreSQL the loop idles while calls queue for the storage threads: the loop's
    lag alone would raise the limit and move the waiting into that queue."""
    s = AdmissionSettings(initial_limit=32, min_limit=4, target_lag_s=0.005, target_storage_wait_s=0.010)
    adm = FairShareAdmission(s)
    while adm.try_admit("a", 1):
        pass  # in use: a lag under target alone would raise it
    adm.adjust(0.0001, busy=0.1, storage_wait_s=0.050)
    assert 32 * 0.9 - 1 <= adm.limit < 32
    assert adm.snapshot()["storage_wait_ms"] == 50.0
    for _ in range(100):
        adm.adjust(0.0001, busy=0.1, storage_wait_s=0.050)
    assert adm.limit == 4
    for _ in range(100):  # calls flow at their target again, the loop keeps up: it rises
        adm.adjust(0.0001, busy=0.1, storage_wait_s=0.001)
        while adm.try_admit("a", 1):
            pass
    assert adm.limit > 4
    held = adm.limit
    for _ in range(5):  # a window in which no call was taken says nothing of the threads
        adm.adjust(0.005, busy=0.1, storage_wait_s=None)
    assert adm.limit == held and adm.snapshot()["storage_wait_ms"] is None


async def test_the_watch_reads_the_storage_threads_wait_each_window() -> None:
    windows: list[None] = []

    def wait() -> float:
        windows.append(None)
        return 0.080

    adm = FairShareAdmission(AdmissionSettings(initial_limit=32, min_limit=4, probe_s=0.002, window=2))
    while adm.try_admit("a", 1):
        pass
    watch = asyncio.create_task(adm.watch(wait))
    try:
        while len(windows) < 5:
            await asyncio.sleep(0.005)
    finally:
        watch.cancel()
    assert adm.limit < 32 and adm.storage_wait_s == 0.080


def _measured_lags(loop_factory: object) -> tuple[float, float]:
    """(lag the limit used, the timer probe's lag) after a heavy tenant's 600 tasks, each
    computing 50 us per step, kept the loop busy for a few windows."""
    from patinox.tenancy import tenant_scope
    from tests._contexts import tenant_context

    adm = FairShareAdmission(AdmissionSettings(probe_s=0.01, window=3))
    heavy = tenant_context("tn_heavy", plan="pro")

    async def spin(stop: asyncio.Event) -> None:
        while not stop.is_set():
            end = time.perf_counter() + 50e-6
            while time.perf_counter() < end:
                pass
            await asyncio.sleep(0)

    async def main() -> tuple[float, float]:
        stop = asyncio.Event()
        with tenant_scope(heavy):
            tasks = [asyncio.create_task(spin(stop)) for _ in range(600)]
        watch = asyncio.create_task(adm.watch())
        await asyncio.sleep(0.4)
        # A loaded machine may not have closed a window of probes yet: wait for one (the
        # guard only stops a hang; what is asserted is what the window measured).
        guard = time.monotonic() + 60
        while (adm.lag_s == 0 or adm.probe_lag_s == 0) and time.monotonic() < guard:
            await asyncio.sleep(0.05)
        stop.set()
        watch.cancel()
        await asyncio.gather(watch, *tasks, return_exceptions=True)
        return adm.lag_s, adm.probe_lag_s

    with asyncio.Runner(loop_factory=loop_factory) as runner:  # type: ignore[arg-type]
        return runner.run(main())


def test_on_a_tenant_fair_loop_the_limit_follows_the_backlog_not_the_probes_turn() -> None:
    from patinox.limits import fair_loop

    # First come, first served: the probe waits out the whole backlog, and that is the lag.
    lag, probe = _measured_lags(asyncio.new_event_loop)
    assert lag == probe and probe > 0.005
    # In turns, the probe (a flow of its own) waits out at most a pass of BATCH callbacks
    # and one turn of the heavy tenant, far less than the backlog, which is what admitting
    # fewer runs would shorten: the limit uses the backlog's lag.
    lag, probe = _measured_lags(fair_loop.new_event_loop)
    assert lag > 0.005 and lag > 3 * probe


def test_a_raised_limit_wakes_a_worker_that_found_the_process_full() -> None:
    adm = FairShareAdmission(AdmissionSettings(initial_limit=16, min_limit=16, max_limit=64))
    assert all(adm.try_admit(f"t{i}", 1) for i in range(20))  # the limit and its headroom
    assert adm.claimable() is None  # full: a worker waits
    woken: list[bool] = []
    adm.notify_when_free(lambda: woken.append(True))
    adm.adjust(0.0001, busy=1.0)  # an idle loop: the limit grows
    assert adm.limit > 16 and woken == [True]
