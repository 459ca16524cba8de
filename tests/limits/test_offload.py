"""The storage executor: calls run in its threads in start-time fair order by tenant, their
outcome comes back to the awaiting task, and a cancellation never runs a withdrawn call nor
abandons one half way. Orders are counted in positions, with real threads held by events,
never in times."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
from collections.abc import Iterator

import pytest

from patinox.errors import ConfigurationError
from patinox.limits import FairStorageExecutor, InlineStorage, storage_calls
from patinox.limits.offload import SYSTEM_FLOW


@pytest.fixture
def one_thread() -> Iterator[FairStorageExecutor]:
    ex = FairStorageExecutor(1)
    try:
        yield ex
    finally:
        ex.close()


async def _until(condition: object) -> None:
    """Yield to the loop until ``condition()`` holds (a thread's progress, not a time)."""
    while not condition():  # type: ignore[operator]
        await asyncio.sleep(0.001)


class _Gate:
    """A call that holds its storage thread until opened (so the calls behind it queue)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self) -> str:
        self.entered.set()
        assert self.open.wait(30)
        return "gate"


async def test_a_tenant_with_fifty_waiting_calls_delays_another_tenants_call_by_a_bounded_number(
    one_thread: FairStorageExecutor,
) -> None:
    order: list[str] = []
    gate = _Gate()
    held = asyncio.ensure_future(one_thread.call("heavy", gate))
    await _until(gate.entered.is_set)
    heavy = [asyncio.ensure_future(one_thread.call("heavy", order.append, f"heavy-{i}")) for i in range(50)]
    await _until(lambda: one_thread.waiting == 50)
    light = asyncio.ensure_future(one_thread.call("light", order.append, "light"))
    await _until(lambda: one_thread.waiting == 51)
    gate.open.set()
    await asyncio.gather(held, light, *heavy)
    # FIFO would put it 51st (index 50); start-time fair order, right after the heavy
    # tenant's first waiting call at most.
    assert order.index("light") <= 1
    assert [o for o in order if o != "light"] == [f"heavy-{i}" for i in range(50)]


async def test_a_tenant_with_nothing_else_waiting_goes_before_six_busy_tenants(
    one_thread: FairStorageExecutor,
) -> None:
    order: list[str] = []
    first, second = _Gate(), _Gate()
    held = asyncio.ensure_future(one_thread.call("busy-0", first))
    await _until(first.entered.is_set)
    busy = []
    for i in range(10):
        for t in range(6):
            if (t, i) == (0, 1):
                busy.append(asyncio.ensure_future(one_thread.call("busy-0", second)))
            else:
                busy.append(
                    asyncio.ensure_future(one_thread.call(f"busy-{t}", order.append, f"busy-{t}-{i}"))
                )
    await _until(lambda: one_thread.waiting == 60)
    first.open.set()
    # Each busy tenant's first call ran; busy-0's second now holds the thread, and each
    # other busy tenant has a call waiting at the same start tag, asked earlier.
    await _until(second.entered.is_set)
    assert order == [f"busy-{t}-0" for t in range(6)]
    order.clear()
    light = [asyncio.ensure_future(one_thread.call("light", order.append, f"light-{n}")) for n in (1, 2)]
    await _until(lambda: one_thread.waiting == 60 - 7 + 2)
    second.open.set()
    await asyncio.gather(held, *light, *busy)
    # Start-time fair order alone puts it after the five equal tags asked before it; its
    # flow is sparse (nothing else of it waited), so it goes first. Its second call had
    # company (its own first): a turn like any other flow's.
    assert order.index("light-1") == 0
    assert order.index("light-2") > 1


async def test_the_wait_window_is_the_mean_wait_of_the_calls_a_thread_took(
    one_thread: FairStorageExecutor,
) -> None:
    assert one_thread.wait_window() is None  # nothing taken yet
    gate = _Gate()
    held = asyncio.ensure_future(one_thread.call("a", gate))
    await _until(gate.entered.is_set)
    one_thread.wait_window()  # the gate's own (short) wait
    waiting = [asyncio.ensure_future(one_thread.call("b", int)) for _ in range(3)]
    await _until(lambda: one_thread.waiting == 3)
    slept = 0.0
    while slept < 0.05:  # they wait while the thread is held
        await asyncio.sleep(0.01)
        slept += 0.01
    gate.open.set()
    await asyncio.gather(held, *waiting)
    mean = one_thread.wait_window()
    assert mean is not None and mean >= 0.05
    assert one_thread.wait_window() is None  # a new window
    assert await InlineStorage().call("a", int) == 0 and InlineStorage().wait_window() is None


async def test_two_busy_tenants_alternate_and_the_system_flow_has_its_own_share(
    one_thread: FairStorageExecutor,
) -> None:
    order: list[str] = []
    gate = _Gate()
    held = asyncio.ensure_future(one_thread.call("a", gate))
    await _until(gate.entered.is_set)
    calls = [asyncio.ensure_future(one_thread.call("a", order.append, "a")) for _ in range(10)]
    calls += [asyncio.ensure_future(one_thread.call("b", order.append, "b")) for _ in range(10)]
    calls += [asyncio.ensure_future(one_thread.system(order.append, "s")) for _ in range(10)]
    await _until(lambda: one_thread.waiting == 30)
    gate.open.set()
    await asyncio.gather(held, *calls)
    # Every window of three consecutive calls serves each flow once.
    for i in range(0, 30, 3):
        assert sorted(order[i : i + 3]) == ["a", "b", "s"], order


async def test_the_result_and_the_exception_of_a_call_reach_its_awaiter(
    one_thread: FairStorageExecutor,
) -> None:
    assert await one_thread.call("t", lambda x, *, y: (x, y, threading.current_thread().name), 1, y=2) == (
        1,
        2,
        "patinox-storage-0",
    )

    class Refused(Exception):
        pass

    def refuse() -> None:
        raise Refused("no")

    with pytest.raises(Refused, match="no"):
        await one_thread.call("t", refuse)
    with pytest.raises(Refused):
        await one_thread.finish("t", refuse)
    assert await one_thread.call("t", int, "7") == 7  # the thread survived both


async def test_a_call_runs_in_a_copy_of_the_callers_context(one_thread: FairStorageExecutor) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("the caller's")
    assert await one_thread.call("t", var.get) == "the caller's"


async def test_a_call_cancelled_while_waiting_never_runs(one_thread: FairStorageExecutor) -> None:
    ran: list[str] = []
    gate = _Gate()
    held = asyncio.ensure_future(one_thread.call("t", gate))
    await _until(gate.entered.is_set)
    waiting = asyncio.ensure_future(one_thread.call("t", ran.append, "withdrawn"))
    after = asyncio.ensure_future(one_thread.call("u", ran.append, "after"))
    await _until(lambda: one_thread.waiting == 2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.open.set()
    await asyncio.gather(held, after)
    assert ran == ["after"]
    assert (one_thread.waiting, one_thread.running, one_thread.flows) == (0, 0, 0)


async def test_a_call_cancelled_while_running_ends_in_its_thread_and_its_result_is_dropped(
    one_thread: FairStorageExecutor,
) -> None:
    gate = _Gate()
    finished = threading.Event()

    class Result:
        pass

    results: list[object] = []

    def slow() -> Result:
        gate()
        finished.set()
        r = Result()
        results.append(r)
        return r

    running = asyncio.ensure_future(one_thread.call("t", slow))
    await _until(gate.entered.is_set)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running  # at once: the call is still running
    assert not finished.is_set()
    gate.open.set()
    assert await one_thread.call("t", int, "1") == 1  # after it, on the one thread
    assert finished.is_set()
    await asyncio.sleep(0)  # the dropped outcome's callback ran
    assert (one_thread.waiting, one_thread.running, one_thread.flows) == (0, 0, 0)
    # Nothing but the test holds the dropped result: no future or queue kept it.
    import weakref

    ref = weakref.ref(results.pop())
    gc.collect()
    assert ref() is None


async def test_finish_runs_to_its_end_and_raises_the_cancellation_after(
    one_thread: FairStorageExecutor,
) -> None:
    gate = _Gate()
    held = asyncio.ensure_future(one_thread.call("t", gate))
    await _until(gate.entered.is_set)
    done: list[str] = []
    waiting = asyncio.ensure_future(one_thread.finish("t", done.append, "settled"))
    await _until(lambda: one_thread.waiting == 1)
    waiting.cancel()  # while queued
    await asyncio.sleep(0)
    assert not waiting.done()  # it waits for the call, not for the cancellation
    waiting.cancel()  # twice
    gate.open.set()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert done == ["settled"]
    await held


async def test_close_runs_what_was_asked_then_refuses_new_calls() -> None:
    ex = FairStorageExecutor(2, name="closing-storage")  # not another executor's threads
    gate = _Gate()
    ran: list[int] = []
    held = asyncio.ensure_future(ex.call("t", gate))
    await _until(gate.entered.is_set)
    queued = [asyncio.ensure_future(ex.call("t", ran.append, i)) for i in range(3)]
    await _until(lambda: len(ran) == 3)  # the second thread takes them
    closing = asyncio.ensure_future(asyncio.to_thread(ex.close))
    await asyncio.sleep(0.01)
    assert not closing.done()  # waits for the held call
    gate.open.set()
    await closing
    await asyncio.gather(held, *queued)
    assert ran == [0, 1, 2]
    assert not any(t.name.startswith("closing-storage") for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        await ex.call("t", int)
    ex.close()  # idempotent


async def test_system_calls_are_their_own_flow(one_thread: FairStorageExecutor) -> None:
    assert SYSTEM_FLOW.startswith("flow:")  # never a tenant id (those are tnt_...)
    assert await one_thread.system(lambda: 3) == 3


def test_thread_counts_are_validated() -> None:
    with pytest.raises(ConfigurationError):
        FairStorageExecutor(0)
    with pytest.raises(ConfigurationError):
        storage_calls("postgresql+psycopg", 65)
    with pytest.raises(ConfigurationError):
        storage_calls("sqlite", -1)


def test_sqlite_and_zero_threads_stay_inline() -> None:
    assert isinstance(storage_calls("sqlite", 3), InlineStorage)
    assert isinstance(storage_calls("postgresql+psycopg", 0), InlineStorage)
    pg = storage_calls("postgresql+psycopg", 2)
    try:
        assert isinstance(pg, FairStorageExecutor) and pg.threads == 2
    finally:
        pg.close()


async def test_inline_calls_run_on_the_callers_thread() -> None:
    inline = InlineStorage()
    me = threading.current_thread()
    assert await inline.call("t", threading.current_thread) is me
    assert await inline.finish("t", threading.current_thread) is me
    assert await inline.system(threading.current_thread) is me


def test_the_setting_is_read_and_validated(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    from patinox.runtime import Settings

    monkeypatch.setenv("PATINOX_STORAGE_THREADS", "5")
    assert Settings.for_data_dir(Path(str(tmp_path))).storage_threads == 5
    monkeypatch.delenv("PATINOX_STORAGE_THREADS")
    assert Settings.for_data_dir(Path(str(tmp_path))).storage_threads == 3
    for bad in ("three", "-1", "65"):
        monkeypatch.setenv("PATINOX_STORAGE_THREADS", bad)
        with pytest.raises(ConfigurationError, match="PATINOX_STORAGE_THREADS"):
            Settings.for_data_dir(Path(str(tmp_path)))
