"""The simulated model: id grammar, exact output tokens, input token counting, latency."""

from __future__ import annotations

import time

import pytest

from patinox.agents import (
    DEFAULT_OUTPUT_TOKENS,
    SIMULATED_MARKER,
    AgentDefinition,
    Conversation,
    RunEvent,
    RunLimits,
    SimulatedLatency,
    count_simulated_tokens,
    run_agent,
    set_default_latency,
)
from patinox.agents import simulated as simulated_module
from patinox.agents.simulated import parse_simulated_model_id, simulated_model
from patinox.errors import UnknownModel

from .fakes import DictMemory

LIMITS = RunLimits(max_output_tokens=2048, max_tool_calls=8, timeout_s=30)


def agent(
    model: str = "simulated:instant", instructions: str = "Be brief.", tools: tuple[str, ...] = ()
) -> AgentDefinition:
    return AgentDefinition(name="a", instructions=instructions, model=model, tools=tools)


# --- model ids ------------------------------------------------------------------------


def test_plain_id_uses_default_latency() -> None:
    assert parse_simulated_model_id("simulated") == SimulatedLatency(ttft_s=0.05, tpot_s=0.002)


def test_instant_has_no_latency() -> None:
    assert parse_simulated_model_id("simulated:instant") == SimulatedLatency(ttft_s=0, tpot_s=0)


def test_explicit_params_are_milliseconds() -> None:
    latency = parse_simulated_model_id("simulated:ttft_ms=20,tpot_ms=1")
    assert latency == SimulatedLatency(ttft_s=0.02, tpot_s=0.001)


def test_missing_param_and_plain_id_follow_rebound_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(simulated_module, "DEFAULT_LATENCY", SimulatedLatency(ttft_s=0.3, tpot_s=0.4))
    assert parse_simulated_model_id("simulated") == SimulatedLatency(ttft_s=0.3, tpot_s=0.4)
    assert parse_simulated_model_id("simulated:tpot_ms=0") == SimulatedLatency(ttft_s=0.3, tpot_s=0)
    assert parse_simulated_model_id("simulated:ttft_ms=0") == SimulatedLatency(ttft_s=0, tpot_s=0.4)


def test_set_default_latency_returns_the_previous_one() -> None:
    configured = SimulatedLatency(ttft_s=0.01, tpot_s=0)
    previous = set_default_latency(configured)
    try:
        assert parse_simulated_model_id("simulated") == configured
    finally:
        assert set_default_latency(previous) == configured
    assert parse_simulated_model_id("simulated") == previous


@pytest.mark.parametrize(
    "model_id",
    [
        "simulated:",
        "simulated:fast",
        "simulated:ttft_ms",
        "simulated:ttft_ms=",
        "simulated:ttft_ms=abc",
        "simulated:ttft_ms=-1",
        "simulated:ttft_ms=nan",
        "simulated:ttft_ms=inf",
        "simulated:ttft_ms=1,ttft_ms=2",
        "simulated:ttft_ms=1;tpot_ms=2",
        "simulated:latency_ms=5",
        "simulated:instant,ttft_ms=1",
        # Matched whole: float() and strip() took these, a newline included.
        "simulated:ttft_ms=20\n",
        "simulated:ttft_ms=20 ",
        "simulated: ttft_ms=20",
        "simulated:ttft_ms= 20",
        "simulated:ttft_ms=2_0",
        "simulated:ttft_ms=1e3",
        "simulated:ttft_ms=+1",
        "simulated:ttft_ms=١٢",
    ],
)
def test_bad_params_are_unknown_models(model_id: str) -> None:
    with pytest.raises(UnknownModel) as info:
        parse_simulated_model_id(model_id)
    assert repr(model_id) in info.value.message
    assert info.value.fields["model"] == model_id


@pytest.mark.parametrize("model_id", ["simulatedx", "openai:gpt-4o", "Simulated"])
def test_other_families_are_not_simulated(model_id: str) -> None:
    with pytest.raises(UnknownModel):
        parse_simulated_model_id(model_id)


def test_model_name_is_the_id() -> None:
    assert simulated_model("simulated:instant").model_name == "simulated:instant"


def test_latency_rejects_negative_values() -> None:
    with pytest.raises(ValueError, match="ttft_s"):
        SimulatedLatency(ttft_s=-0.1, tpot_s=0)


def test_delay_formula() -> None:
    assert SimulatedLatency(ttft_s=0.5, tpot_s=0.25).delay_s(4) == pytest.approx(1.5)


def test_tokenizer_counts_whitespace_words() -> None:
    assert count_simulated_tokens("  one two\tthree\nfour  ") == 4
    assert count_simulated_tokens("") == 0


# --- output -----------------------------------------------------------------------------


@pytest.mark.parametrize("requested", [1, 2, 16, 500, 2048])
async def test_reply_has_exactly_the_requested_tokens(requested: int) -> None:
    outcome = await run_agent(
        agent(), "hello there", output_tokens=requested, limits=LIMITS, memory=DictMemory()
    )
    assert count_simulated_tokens(outcome.output) == requested
    assert outcome.output_tokens == requested
    assert outcome.output.split()[0] == SIMULATED_MARKER
    assert outcome.simulated is True
    assert outcome.model == "simulated:instant"


async def test_one_token_is_just_the_marker() -> None:
    outcome = await run_agent(agent(), "hi", output_tokens=1, limits=LIMITS, memory=DictMemory())
    assert outcome.output == "[simulated]"


async def test_default_reply_length_is_16() -> None:
    outcome = await run_agent(agent(), "hi", output_tokens=None, limits=LIMITS, memory=DictMemory())
    assert DEFAULT_OUTPUT_TOKENS == 16
    assert count_simulated_tokens(outcome.output) == 16
    assert outcome.output_tokens == 16


async def test_reply_is_deterministic() -> None:
    first = await run_agent(agent(), "hi", output_tokens=40, limits=LIMITS, memory=DictMemory())
    second = await run_agent(agent(), "hi", output_tokens=40, limits=LIMITS, memory=DictMemory())
    assert first.output == second.output


# --- input tokens ------------------------------------------------------------------------


async def test_input_tokens_are_instruction_and_prompt_words() -> None:
    outcome = await run_agent(
        agent(instructions="You are a  terse\nassistant."),
        "one two three four five",
        output_tokens=3,
        limits=LIMITS,
        memory=DictMemory(),
    )
    assert (outcome.input_tokens, outcome.requests) == (5 + 5, 1)


async def test_input_tokens_count_history_of_every_request() -> None:
    # request 1: "Be brief." (2) + prompt (5 words)                                  = 7
    # response 1: tool call "calculator {"expression":"1+1"}"                         = 2 out
    # request 2: 2 + 5 + previous response (2) + tool return "2" (1)                  = 10
    # response 2: the final reply                                                     = 8 out
    outcome = await run_agent(
        agent(tools=("calculator",)),
        'go\n/call calculator {"expression": "1+1"}',
        output_tokens=8,
        limits=LIMITS,
        memory=DictMemory(),
    )
    assert outcome.output == "[simulated] calculator = 2 this reply was generated"
    assert (outcome.input_tokens, outcome.output_tokens) == (17, 10)
    assert (outcome.requests, outcome.tool_calls) == (2, 1)


# --- latency ---------------------------------------------------------------------------------


async def test_latency_of_one_response_follows_the_formula() -> None:
    started = time.perf_counter()
    outcome = await run_agent(
        agent(model="simulated:ttft_ms=20,tpot_ms=1"),
        "hi",
        output_tokens=30,
        limits=LIMITS,
        memory=DictMemory(),
    )
    elapsed = time.perf_counter() - started
    bound = 0.020 + 0.001 * 30
    assert elapsed >= bound - 0.001  # asyncio may wake a timer up to its clock resolution early
    assert outcome.duration_ms >= (bound - 0.001) * 1000


async def test_latency_adds_up_over_tool_call_responses() -> None:
    started = time.perf_counter()
    await run_agent(
        agent(model="simulated:ttft_ms=15,tpot_ms=2", tools=("calculator",)),
        '/call calculator {"expression": "1+1"}',
        output_tokens=10,
        limits=LIMITS,
        memory=DictMemory(),
    )
    elapsed = time.perf_counter() - started
    # two responses: a tool call of 2 tokens, then the reply of 10 tokens
    bound = 2 * 0.015 + 0.002 * (2 + 10)
    assert elapsed >= bound - 0.001


# --- streaming -------------------------------------------------------------------------------


async def test_a_streamed_run_delivers_each_word_at_the_stated_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream waits ttft, then tpot before each word (delays recorded, not timed), and
    its deltas and usage are those of the same run not streamed."""
    plain = await run_agent(agent(), "hello there", output_tokens=5, limits=LIMITS, memory=DictMemory())
    waits: list[float] = []
    real_sleep = simulated_module.asyncio.sleep

    async def sleep(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(simulated_module.asyncio, "sleep", sleep)
    events: list[RunEvent] = []
    streamed = await run_agent(
        agent(model="simulated:ttft_ms=30,tpot_ms=4"),
        "hello there",
        output_tokens=5,
        limits=LIMITS,
        memory=DictMemory(),
        conversation=Conversation(on_event=events.append),
    )
    assert waits == [0.030] + [0.004] * 5
    texts = [e.text for e in events if e.kind == "text"]
    assert len(texts) == 5 and "".join(texts) == streamed.output == plain.output
    assert (streamed.input_tokens, streamed.output_tokens) == (plain.input_tokens, plain.output_tokens)


async def test_a_streamed_tool_call_arrives_whole_after_its_tokens_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    real_sleep = simulated_module.asyncio.sleep

    async def sleep(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(simulated_module.asyncio, "sleep", sleep)
    events: list[RunEvent] = []
    await run_agent(
        agent(model="simulated:ttft_ms=10,tpot_ms=1", tools=("calculator",)),
        '/call calculator {"expression": "1+1"}',
        output_tokens=3,
        limits=LIMITS,
        memory=DictMemory(),
        conversation=Conversation(on_event=events.append),
    )
    # the tool call (2 tokens) whole after ttft + 2 tpot, then the reply word by word
    assert waits == [0.010, 0.002, 0.010, 0.001, 0.001, 0.001]
    assert [e.kind for e in events] == ["tool_call", "tool_result", "text", "text", "text"]
    assert events[1].result == "2" and events[1].tool_call_id == events[0].tool_call_id


async def test_history_reaches_the_model_after_the_instructions() -> None:
    outcome = await run_agent(
        agent(instructions="Be brief."),
        "and now",
        output_tokens=2,
        limits=LIMITS,
        memory=DictMemory(),
        conversation=Conversation(
            history=(("system", "speak french"), ("user", "hi"), ("assistant", "salut"))
        ),
    )
    # instructions 2 + system 2 + user 1 + assistant 1 + prompt 2 words
    assert outcome.input_tokens == 8
