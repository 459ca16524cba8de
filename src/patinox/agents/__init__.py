"""Agents: definitions, the run loop, models (simulated by default) and built-in tools.

Runs go through pydantic-ai; the offline simulated model (:mod:`patinox.agents.simulated`)
is the default and is labelled as simulated in every outcome (``RunOutcome.simulated``) and
reply (it starts with ``[simulated]``).
"""

from patinox.agents.models import is_simulated, resolve_model, validate_model_id
from patinox.agents.runner import AgentDefinition, Conversation, RunEvent, RunLimits, RunOutcome, run_agent
from patinox.agents.simulated import (
    DEFAULT_OUTPUT_TOKENS,
    SIMULATED_MARKER,
    SimulatedLatency,
    count_simulated_tokens,
    set_default_latency,
)
from patinox.agents.tools import (
    BUILTIN_TOOLS,
    TOOL_ENTRY_POINT_GROUP,
    TOOL_ISOLATION,
    CalculatorError,
    CodeResult,
    CodeRunner,
    FetchedPage,
    HttpFetcher,
    MemoryStore,
    ToolDeps,
    calculator,
    check_tool_isolation,
    check_tools_allowed,
    known_tools,
    required_isolation,
    validate_tool_names,
)

__all__ = [
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
