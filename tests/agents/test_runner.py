"""run_agent: tools through /call lines, validation, limits, timeouts, error mapping."""

from __future__ import annotations

import asyncio
import pickle

import pytest

import patinox.agents
from patinox.agents import (
    AgentDefinition,
    MemoryStore,
    RunLimits,
    count_simulated_tokens,
    run_agent,
)
from patinox.errors import InvalidRequest, RunFailed, StorageError, UnknownModel, UnknownTool

from .fakes import DictMemory


class FailingMemory(DictMemory):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def memory_put(self, key: str, value: str) -> None:
        raise self.error


ALL_TOOLS = ("memory_get", "memory_put", "memory_list", "calculator", "current_time")
LIMITS = RunLimits(max_output_tokens=2048, max_tool_calls=8, timeout_s=30)


def agent(model: str = "simulated:instant", tools: tuple[str, ...] = ALL_TOOLS) -> AgentDefinition:
    return AgentDefinition(name="helper", instructions="Use tools.", model=model, tools=tools)


def test_public_api_is_pinned() -> None:
    assert patinox.agents.__all__ == [
        "BUILTIN_TOOLS",
        "DEFAULT_OUTPUT_TOKENS",
        "SIMULATED_MARKER",
        "TOOL_ENTRY_POINT_GROUP",
        "TOOL_ISOLATION",
        "AgentDefinition",
        "CalculatorError",
        "CodeResult",
        "CodeRunner",
        "Conversation",
        "FetchedPage",
        "HttpFetcher",
        "MemoryStore",
        "RunEvent",
        "RunLimits",
        "RunOutcome",
        "SimulatedLatency",
        "ToolDeps",
        "calculator",
        "check_tool_isolation",
        "check_tools_allowed",
        "count_simulated_tokens",
        "is_simulated",
        "known_tools",
        "required_isolation",
        "resolve_model",
        "run_agent",
        "set_default_latency",
        "validate_model_id",
        "validate_tool_names",
    ]
    for name in patinox.agents.__all__:
        assert hasattr(patinox.agents, name)


def test_dict_memory_satisfies_the_protocol() -> None:
    store: MemoryStore = DictMemory()
    store.memory_put("k", "v")
    assert store.memory_get("k") == "v"


# --- tools through /call lines ---------------------------------------------------------------


async def test_memory_put_then_get_through_the_store() -> None:
    memory = DictMemory()
    prompt = (
        "remember this\n"
        '/call memory_put {"key": "colour", "value": "deep blue"}\n'
        '/call memory_get {"key": "colour"}\n'
    )
    outcome = await run_agent(agent(), prompt, output_tokens=12, limits=LIMITS, memory=memory)
    assert memory.data == {"colour": "deep blue"}
    assert outcome.output == (
        '[simulated] memory_put = ok memory_get = {"value":"deep blue"} this reply was generated'
    )
    assert (outcome.tool_calls, outcome.requests) == (2, 3)


async def test_memory_list_and_missing_key() -> None:
    memory = DictMemory()
    memory.data.update({"a/1": "x", "a/2": "y", "b/1": "z"})
    prompt = '/call memory_list {"prefix": "a/"}\n/call memory_get {"key": "nope"}'
    outcome = await run_agent(agent(), prompt, output_tokens=9, limits=LIMITS, memory=memory)
    assert outcome.output == (
        '[simulated] memory_list = ["a/1","a/2"] memory_get = {"value":null} this reply'
    )


async def test_calculator_and_clock() -> None:
    prompt = '/call calculator {"expression": "2*(3+4)"}\n/call current_time {}'
    outcome = await run_agent(agent(), prompt, output_tokens=7, limits=LIMITS, memory=DictMemory())
    words = outcome.output.split()
    assert words[:4] == ["[simulated]", "calculator", "=", "14"]
    assert words[4:6] == ["current_time", "="]
    assert words[6].endswith("+00:00")


async def test_results_are_truncated_to_the_requested_tokens() -> None:
    prompt = '/call calculator {"expression": "6*7"}'
    outcome = await run_agent(agent(), prompt, output_tokens=3, limits=LIMITS, memory=DictMemory())
    assert outcome.output == "[simulated] calculator ="


async def test_refused_expression_is_reported_to_the_model_not_a_crash() -> None:
    prompt = "/call calculator {\"expression\": \"__import__('os').system('true')\"}"
    outcome = await run_agent(agent(), prompt, output_tokens=30, limits=LIMITS, memory=DictMemory())
    assert outcome.output.startswith("[simulated] calculator failed: calculator refused")
    assert outcome.tool_calls == 0  # pydantic-ai counts successful calls only


async def test_only_the_definitions_tools_are_registered() -> None:
    memory = DictMemory()
    prompt = '/call memory_put {"key": "k", "value": "v"}'
    with pytest.raises(RunFailed) as info:
        await run_agent(agent(tools=("calculator",)), prompt, output_tokens=4, limits=LIMITS, memory=memory)
    assert info.value.fields["reason"] == "model_error"
    assert memory.data == {}


async def test_unknown_tool_in_a_call_line_ends_as_run_failed() -> None:
    with pytest.raises(RunFailed) as info:
        await run_agent(agent(), "/call rm_rf {}", output_tokens=4, limits=LIMITS, memory=DictMemory())
    failure = info.value
    assert failure.fields["reason"] == "model_error"
    assert "rm_rf" in failure.message
    assert failure.fields["requests"] == 2  # first call, then the retry pydantic-ai asked for
    assert failure.__cause__ is not None


async def test_malformed_call_line_ends_as_run_failed() -> None:
    with pytest.raises(RunFailed) as info:
        await run_agent(
            agent(), "/call calculator [1, 2]", output_tokens=4, limits=LIMITS, memory=DictMemory()
        )
    assert info.value.fields["reason"] == "model_error"
    assert "JSON object" in info.value.message


async def test_concurrent_runs_use_their_own_store() -> None:
    # Model latency makes the two runs interleave at every model response.
    first, second = DictMemory(), DictMemory()

    def prompt(value: str) -> str:
        return f'/call memory_put {{"key": "k", "value": "{value}"}}\n/call memory_get {{"key": "k"}}'

    slow = agent("simulated:ttft_ms=20,tpot_ms=0")
    one, two = await asyncio.gather(
        run_agent(slow, prompt("first"), output_tokens=8, limits=LIMITS, memory=first),
        run_agent(slow, prompt("second"), output_tokens=8, limits=LIMITS, memory=second),
    )
    assert (first.data, second.data) == ({"k": "first"}, {"k": "second"})
    assert 'memory_get = {"value":"first"}' in one.output and "second" not in one.output
    assert 'memory_get = {"value":"second"}' in two.output and "first" not in two.output


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", [0, -1, 2049, True, 1.5])
async def test_output_tokens_out_of_range(requested: int) -> None:
    with pytest.raises(InvalidRequest) as info:
        await run_agent(agent(), "hi", output_tokens=requested, limits=LIMITS, memory=DictMemory())
    assert info.value.fields["field"] == "output_tokens"


async def test_output_tokens_at_the_limit_is_allowed() -> None:
    limits = RunLimits(max_output_tokens=5, max_tool_calls=0, timeout_s=5)
    outcome = await run_agent(agent(), "hi", output_tokens=5, limits=limits, memory=DictMemory())
    assert count_simulated_tokens(outcome.output) == 5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_output_tokens": 0, "max_tool_calls": 1, "timeout_s": 1}, "max_output_tokens"),
        ({"max_output_tokens": 1, "max_tool_calls": -1, "timeout_s": 1}, "max_tool_calls"),
        ({"max_output_tokens": 1, "max_tool_calls": 1, "timeout_s": 0}, "timeout_s"),
        ({"max_output_tokens": 1, "max_tool_calls": 1, "timeout_s": float("nan")}, "timeout_s"),
    ],
)
def test_run_limits_are_validated(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        RunLimits(**kwargs)  # type: ignore[arg-type]
    assert info.value.fields["field"] == field


async def test_unknown_tool_in_definition() -> None:
    with pytest.raises(UnknownTool):
        await run_agent(agent(tools=("shell",)), "hi", output_tokens=1, limits=LIMITS, memory=DictMemory())


async def test_unknown_model_in_definition() -> None:
    with pytest.raises(UnknownModel):
        await run_agent(agent(model="gpt-4o"), "hi", output_tokens=1, limits=LIMITS, memory=DictMemory())


# --- limits and failures ------------------------------------------------------------------------


async def test_tool_call_limit() -> None:
    limits = RunLimits(max_output_tokens=100, max_tool_calls=1, timeout_s=30)
    memory = DictMemory()
    prompt = '/call memory_put {"key": "a", "value": "1"}\n/call memory_put {"key": "b", "value": "2"}'
    with pytest.raises(RunFailed) as info:
        await run_agent(agent(), prompt, output_tokens=4, limits=limits, memory=memory)
    failure = info.value
    assert failure.fields["reason"] == "tool_call_limit"
    assert failure.fields["limit"] == 1
    assert (failure.fields["tool_calls"], failure.fields["requests"]) == (1, 2)
    assert failure.fields["input_tokens"] > 0 and failure.fields["output_tokens"] > 0
    assert memory.data == {"a": "1"}
    assert type(failure.__cause__).__name__ == "UsageLimitExceeded"


async def test_zero_tool_calls_allowed() -> None:
    limits = RunLimits(max_output_tokens=100, max_tool_calls=0, timeout_s=30)
    with pytest.raises(RunFailed) as info:
        await run_agent(agent(), "/call current_time {}", output_tokens=4, limits=limits, memory=DictMemory())
    assert info.value.fields["reason"] == "tool_call_limit"
    assert info.value.fields["tool_calls"] == 0


async def test_request_limit_bounds_a_loop_of_failing_calls() -> None:
    # Refused expressions are not successful tool calls, so only the request limit stops them.
    prompt = "\n".join(['/call calculator {"expression": "x"}'] * 60)
    with pytest.raises(RunFailed) as info:
        await run_agent(agent(), prompt, output_tokens=4, limits=LIMITS, memory=DictMemory())
    assert info.value.fields["reason"] == "request_limit"
    assert info.value.fields["requests"] == 50


async def test_timeout() -> None:
    limits = RunLimits(max_output_tokens=100, max_tool_calls=4, timeout_s=0.05)
    with pytest.raises(RunFailed) as info:
        await run_agent(
            agent(model="simulated:ttft_ms=5000,tpot_ms=0"),
            "hi",
            output_tokens=4,
            limits=limits,
            memory=DictMemory(),
        )
    failure = info.value
    assert failure.fields["reason"] == "timeout"
    assert failure.fields["requests"] == 0
    assert isinstance(failure.__cause__, TimeoutError)


async def test_timeout_keeps_usage_so_far_and_leaves_no_write_behind() -> None:
    """A run cancelled by its timeout stops at once; store calls run inline, so none lands later."""
    memory = DictMemory()
    limits = RunLimits(max_output_tokens=100, max_tool_calls=4, timeout_s=0.3)
    prompt = '/call memory_put {"key": "a", "value": "1"}\n/call memory_put {"key": "b", "value": "2"}'
    with pytest.raises(RunFailed) as info:
        await run_agent(
            agent("simulated:ttft_ms=200,tpot_ms=0"), prompt, output_tokens=4, limits=limits, memory=memory
        )
    failure = info.value
    assert failure.fields["reason"] == "timeout"
    assert (failure.fields["tool_calls"], failure.fields["requests"]) == (1, 1)
    await asyncio.sleep(0.3)
    assert memory.data == {"a": "1"}


async def test_tool_exception_is_tool_error_with_original_chained() -> None:
    original = RuntimeError("connection string postgres://secret@db")
    prompt = '/call memory_put {"key": "a", "value": "1"}'
    with pytest.raises(RunFailed) as info:
        await run_agent(agent(), prompt, output_tokens=4, limits=LIMITS, memory=FailingMemory(original))
    failure = info.value
    assert failure.fields["reason"] == "tool_error"
    assert failure.fields["tool"] == "memory_put"
    assert failure.__cause__ is original
    assert "secret" not in failure.message and "RuntimeError" in failure.message
    assert failure.fields["requests"] == 1


async def test_patinox_error_from_the_store_keeps_its_message() -> None:
    original = StorageError("the database is unavailable")
    prompt = '/call memory_put {"key": "a", "value": "1"}'
    with pytest.raises(RunFailed) as info:
        await run_agent(agent(), prompt, output_tokens=4, limits=LIMITS, memory=FailingMemory(original))
    assert "the database is unavailable" in info.value.message
    assert info.value.__cause__ is original


async def test_run_failed_survives_pickling() -> None:
    with pytest.raises(RunFailed) as info:
        await run_agent(agent(), "/call nope {}", output_tokens=4, limits=LIMITS, memory=DictMemory())
    copy = pickle.loads(pickle.dumps(info.value))
    assert isinstance(copy, RunFailed)
    assert copy.fields == info.value.fields
    assert copy.fields["simulated"] is True
    assert copy.fields["model"] == "simulated:instant"
