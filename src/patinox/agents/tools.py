"""Built-in agent tools and the memory protocol they use.

Built-in tools (names as the model sees them):

- ``memory_get(key)`` -> ``{"value": <text>}``, or ``{"value": null}`` if nothing is stored
  (an object, so that "nothing stored" and "an empty text stored" read differently).
- ``memory_put(key, value)`` -> ``"ok"``. The only built-in tool with a side effect, and
  safe to repeat: it replaces the value under the key, so writing the same value again
  leaves memory as one write did. A queued run executed again after its worker died
  (execution is at-least-once) repeats its calls; if its model writes another value the
  second time, the last write wins, as for any two writes of one key.
- ``memory_list(prefix="")`` -> up to :data:`MEMORY_LIST_LIMIT` keys starting with ``prefix``.
- ``calculator(expression)`` -> the value of an arithmetic expression (see :func:`calculator`).
- ``current_time()`` -> the current UTC time, ISO 8601 (``2025-01-31T12:00:00.000+00:00``).
- ``python(code)`` -> ``{"stdout", "stderr", "exit_status", "timed_out", "truncated"}``: runs
  model-written Python in a fresh child process through the run's :class:`CodeRunner`
  (inside the tenant's sandbox, with its per-call time limit and output cap). Only for
  tenants at ``container`` isolation or above (:data:`TOOL_ISOLATION`,
  :func:`check_tool_isolation`): a ``process``-level execution process shares the host's
  network and file system, no place for code nobody reviewed.

Memory tools talk to the :class:`MemoryStore` in the run's :class:`ToolDeps`. That store is
already bound to one tenant, so no tool ever takes or passes a tenant id. Store methods are
synchronous and are called inline on the event loop (one short transaction each): a run that
is cancelled (timeout, tenant suspended or deleted) can then never leave a store write
behind that lands after the cancellation, which a call abandoned in a worker thread could.
The calculator and the clock are computed inline too.

Failures:
    A refused calculator expression, and a ``memory_get`` / ``memory_list`` / ``python``
    result too large for the run's remaining token budget, are reported to the model as a
    failed tool result (:class:`pydantic_ai.exceptions.ToolFailed`): the run goes on and the
    model can adapt. A ``python`` call that fails, times out or prints too much is a result
    too (its exit status, ``timed_out``, ``truncated``).
    A ``python`` call that leaves the tenant's directory full raises
    :class:`ToolLimitReached` (``reason="disk_limit"``), which ends the run with
    ``RunFailed(reason="disk_limit")``; a run with no code runner (``python`` reached below
    the ``container`` level) ends with ``tool_error``.
    Any other exception from a tool (a store error, a bug) is wrapped in
    :class:`ToolExecutionError`, which ends the run; the runner turns it into
    ``RunFailed(reason="tool_error")``.

The :class:`pydantic_ai.Tool` objects are built once, at import: building one costs about
0.3-0.5 ms (JSON schema generation), which would otherwise be paid on every run.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, ParamSpec, Protocol, TypeVar

from pydantic_ai import RunContext, Tool
from pydantic_ai.exceptions import ModelRetry, ToolFailed

from patinox.agents.simulated import count_simulated_tokens
from patinox.errors import InvalidRequest, IsolationRequired, UnknownTool
from patinox.tenancy import IsolationLevel

__all__ = [
    "BUILTIN_TOOLS",
    "MAX_EXPRESSION_CHARS",
    "MAX_INT_BITS",
    "MEMORY_LIST_LIMIT",
    "TOOL_ISOLATION",
    "CalculatorError",
    "CodeResult",
    "CodeRunner",
    "MemoryStore",
    "ToolDeps",
    "ToolExecutionError",
    "ToolLimitReached",
    "builtin_tools",
    "calculator",
    "check_tool_isolation",
    "isolation_allows",
    "required_isolation",
    "validate_tool_names",
]

MEMORY_LIST_LIMIT: Final = 100
"""Most keys one ``memory_list`` call returns."""
MAX_EXPRESSION_CHARS: Final = 1_000
"""Longest expression the calculator accepts, characters."""
MAX_INT_BITS: Final = 4_096
"""Largest integer (operand, intermediate or result) the calculator handles, bits (~1233 digits)."""
_MAX_DEPTH: Final = 64


class MemoryStore(Protocol):
    """Agent memory of one tenant: string values under string keys.

    Implementations are bound to a tenant before a run starts; methods may block (they are
    called from a worker thread, possibly concurrently for concurrent runs) and may raise on
    storage failure, which ends the run with ``RunFailed(reason="tool_error")``.
    """

    def memory_get(self, key: str) -> str | None:
        """The value under ``key``, or ``None`` if there is none."""
        ...

    def memory_put(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value: idempotent, so a
        run executed again (after its worker died) may repeat it.

        Raises:
            InvalidRequest: the store refuses ``key`` (its length or characters); the
                ``memory_put`` tool reports the message to the model.
        """
        ...

    def memory_list(self, prefix: str = "", limit: int = 100) -> list[str]:
        """Up to ``limit`` keys starting with ``prefix``, in a stable order."""
        ...


@dataclass(frozen=True, kw_only=True)
class CodeResult:
    """What one run of model-written code gave (:func:`patinox.isolation.code.run_code`).

    Attributes:
        stdout: what it printed on stdout (UTF-8, undecodable bytes replaced).
        stderr: what it printed on stderr.
        exit_status: its exit status; ``-N`` when killed by signal N (``-9`` on a timeout).
        timed_out: it ran past its time limit and was killed.
        truncated: output past the cap (stdout and stderr together) was dropped.
        disk_full: the tenant's writable directory was full after the call (or the code
            failed with ``ENOSPC``).
    """

    stdout: str
    stderr: str
    exit_status: int
    timed_out: bool
    truncated: bool
    disk_full: bool


class CodeRunner(Protocol):
    """Runs ``python`` tool calls of one tenant: each call in a fresh child process inside
    the tenant's sandbox, bound to its limits (``code_timeout_s``, ``code_output_bytes``)
    and its writable directory (:class:`patinox.isolation.code.CodeRunner`)."""

    async def run(self, code: str) -> CodeResult:
        """Run ``code`` once; a cancelled call kills what it started."""
        ...


@dataclass(frozen=True, kw_only=True)
class ToolDeps:
    """What tools of one run can reach (pydantic-ai ``deps``).

    Attributes:
        memory: the tenant-bound memory store of the run.
        code: the runner of the ``python`` tool; ``None`` below the ``container`` level,
            where a call of it ends the run (``tool_error``).
    """

    memory: MemoryStore
    code: CodeRunner | None = None


class ToolExecutionError(Exception):
    """A tool raised an unexpected exception; the original is chained as ``__cause__``.

    Attributes:
        tool_name: the tool that failed.
    """

    def __init__(self, tool_name: str) -> None:
        super().__init__(f"tool {tool_name!r} failed")
        self.tool_name = tool_name


class ToolLimitReached(Exception):
    """A tool hit one of the tenant's resource limits, which ends the run with
    ``RunFailed(reason=reason)`` (the runner reads ``reason``).

    Attributes:
        reason: the :class:`~patinox.errors.RunFailed` reason (``disk_limit``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CalculatorError(ValueError):
    """The calculator refused or could not evaluate an expression (the message says why)."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _tool_boundary(
    name: str,
) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Coroutine[Any, Any, _R]]]:
    """Wrap unexpected exceptions of a tool in ToolExecutionError; let pydantic-ai signals pass."""

    def decorate(function: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        @functools.wraps(function)
        async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return await function(*args, **kwargs)
            except (ModelRetry, ToolFailed):
                raise
            except Exception as exc:
                raise ToolExecutionError(name) from exc

        return wrapper

    return decorate


# --- calculator -----------------------------------------------------------------------

_BINARY: Final[Mapping[type[ast.operator], Callable[[float, float], float]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: Final[Mapping[type[ast.unaryop], Callable[[float], float]]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely, by walking its syntax tree (never ``eval``).

    Allowed: int and float literals, ``+ - * / // % **``, unary ``-`` and ``+``, parentheses.
    Everything else (names, calls, attributes, subscripts, strings, comparisons...) is
    refused. Bounds against denial of service: at most :data:`MAX_EXPRESSION_CHARS`
    characters, nesting depth 64, integers of at most :data:`MAX_INT_BITS` bits (a power is
    refused before it is computed if its result would be larger), finite floats only.

    Args:
        expression: e.g. ``"2*(3+4)"``.

    Returns:
        The value: an int when every step stays integral, else a float.

    Raises:
        CalculatorError: the expression is refused, malformed, too large, divides by zero,
            or its result is not a finite real number.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from exc
    return _evaluate(tree.body, 0)


def _evaluate(node: ast.AST, depth: int) -> int | float:
    if depth > _MAX_DEPTH:
        raise CalculatorError(f"expression nested deeper than {_MAX_DEPTH} levels")
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculatorError(f"only numbers are allowed, not {value!r}")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand, depth + 1)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _evaluate(node.left, depth + 1)
        right = _evaluate(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as exc:
            raise CalculatorError("division by zero") from exc
        except OverflowError as exc:
            raise CalculatorError("result too large") from exc
        return _checked(result)
    raise CalculatorError(f"{type(node).__name__} is not allowed; only arithmetic on numbers")


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power whose result would exceed the bounds, before computing it."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if abs(base) > 1 and math.log2(abs(base)) * exponent > MAX_INT_BITS:
            raise CalculatorError(f"result would exceed {MAX_INT_BITS} bits")
    elif abs(exponent) > MAX_INT_BITS:
        raise CalculatorError(f"exponent larger than {MAX_INT_BITS} in absolute value")


def _checked(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalculatorError("result is not a real number")
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise CalculatorError(f"integer larger than {MAX_INT_BITS} bits")
        return value
    if not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value


# --- the tools as the model sees them ---------------------------------------------------


def _fits_budget(ctx: RunContext[ToolDeps], tool: str, texts: Iterable[str]) -> None:
    """Refuse a result the run's token cap cannot carry.

    pydantic-ai checks ``total_tokens_limit`` only after a model response, and the next
    request sends this result back to the model: a large stored value (up to a million
    characters) would be sent, and paid for, whole, far past the tokens reserved for the
    run and the tenant's daily budget. Counted with the simulated tokenizer (for real
    providers an estimate, as the reservation is).

    Raises:
        ToolFailed: the run's tokens so far plus the result's would pass its cap (the model
            is told so in a few words, instead of being sent the result).
    """
    limits = ctx.usage_limits
    cap = limits.total_tokens_limit if limits is not None else None
    if cap is None:
        return
    tokens = sum(count_simulated_tokens(t) for t in texts)
    if ctx.usage.total_tokens + tokens > cap:
        raise ToolFailed(f"{tool} result of {tokens} tokens does not fit in this run's token budget")


@_tool_boundary("memory_get")
async def memory_get(ctx: RunContext[ToolDeps], key: str) -> dict[str, str | None]:
    """Read a value from the agent's memory.

    Args:
        key: the key to read.

    Returns:
        {"value": the stored text}, or {"value": null} when nothing is stored under the key.
    """
    value = ctx.deps.memory.memory_get(key)
    if value is not None:
        _fits_budget(ctx, "memory_get", (value,))
    return {"value": value}


@_tool_boundary("memory_put")
async def memory_put(ctx: RunContext[ToolDeps], key: str, value: str) -> str:
    """Store a value in the agent's memory, replacing any previous value under the key.
    Writing the same value again leaves memory as it was, so repeating the call is safe.

    Args:
        key: the key to write.
        value: the text to store.

    Returns:
        "ok" once stored.
    """
    try:
        ctx.deps.memory.memory_put(key, value)
    except InvalidRequest as err:  # a key the store refuses: the model is told why
        raise ToolFailed(err.message) from err
    return "ok"


@_tool_boundary("memory_list")
async def memory_list(ctx: RunContext[ToolDeps], prefix: str = "") -> list[str]:
    """List keys in the agent's memory (at most 100).

    Args:
        prefix: only keys starting with this text; empty for all keys.

    Returns:
        The matching keys.
    """
    keys = ctx.deps.memory.memory_list(prefix, MEMORY_LIST_LIMIT)
    _fits_budget(ctx, "memory_list", keys)
    return keys


@_tool_boundary("calculator")
async def calculator_tool(expression: str) -> int | float:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, unary minus, parentheses.

    Args:
        expression: the expression, e.g. "2*(3+4)".

    Returns:
        The numeric value.
    """
    try:
        return calculator(expression)
    except CalculatorError as exc:
        raise ToolFailed(f"calculator refused the expression: {exc}") from exc


@_tool_boundary("current_time")
async def current_time() -> str:
    """The current date and time in UTC.

    Returns:
        The time as ISO 8601 text in UTC, with milliseconds.
    """
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@_tool_boundary("python")
async def python_tool(ctx: RunContext[ToolDeps], code: str) -> dict[str, str | int | bool]:
    """Run Python code in a fresh sandboxed process and return what it printed.
    Each call starts a new interpreter: nothing is kept in memory between calls, but files
    written in the working directory stay. No network. Print the values you need.

    Args:
        code: the program, e.g. "print(6*7)".

    Returns:
        {"stdout", "stderr", "exit_status", "timed_out", "truncated"}: the output (cut at the
        tenant's output cap when "truncated"), the exit status (0 on success), and whether
        the program was stopped at the tenant's time limit.
    """
    runner = ctx.deps.code
    if runner is None:
        raise IsolationRequired(
            "the python tool runs only at container isolation or above; this run has no code sandbox",
            tool="python",
            required=IsolationLevel.CONTAINER.value,
        )
    result = await runner.run(code)
    if result.disk_full:
        raise ToolLimitReached("disk_limit", "the tenant's writable directory is full")
    _fits_budget(ctx, "python", (result.stdout, result.stderr))
    return {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "exit_status": result.exit_status,
        "timed_out": result.timed_out,
        "truncated": result.truncated,
    }


_TOOLS: Final[Mapping[str, Tool[ToolDeps]]] = {
    "memory_get": Tool(memory_get, takes_ctx=True, name="memory_get"),
    "memory_put": Tool(memory_put, takes_ctx=True, name="memory_put"),
    "memory_list": Tool(memory_list, takes_ctx=True, name="memory_list"),
    "calculator": Tool(calculator_tool, takes_ctx=False, name="calculator"),
    "current_time": Tool(current_time, takes_ctx=False, name="current_time"),
    "python": Tool(python_tool, takes_ctx=True, name="python"),
}

BUILTIN_TOOLS: Final[frozenset[str]] = frozenset(_TOOLS)
"""Names of the built-in tools."""


def validate_tool_names(names: Iterable[str]) -> tuple[str, ...]:
    """Check tool names of an agent definition.

    Args:
        names: tool names, in the order the agent lists them.

    Returns:
        The names as a tuple, in the given order.

    Raises:
        UnknownTool: a name is not a built-in tool, or appears twice (fields ``tool``,
            ``known``).
    """
    seen: list[str] = []
    for name in names:
        if name not in BUILTIN_TOOLS:
            raise UnknownTool(
                f"unknown tool {name!r}; known tools: {', '.join(sorted(BUILTIN_TOOLS))}",
                tool=name,
                known=sorted(BUILTIN_TOOLS),
            )
        if name in seen:
            raise UnknownTool(f"tool {name!r} listed twice", tool=name, known=sorted(BUILTIN_TOOLS))
        seen.append(name)
    return tuple(seen)


TOOL_ISOLATION: Final[Mapping[str, IsolationLevel]] = {"python": IsolationLevel.CONTAINER}
"""The lowest isolation level each tool needs; a tool not listed runs at every level."""

_LEVEL_ORDER: Final = (
    IsolationLevel.NAMESPACE,
    IsolationLevel.PROCESS,
    IsolationLevel.CONTAINER,
    IsolationLevel.DEDICATED,
)


def isolation_allows(level: IsolationLevel, required: IsolationLevel) -> bool:
    """Whether ``level`` isolates at least as much as ``required``
    (namespace < process < container < dedicated)."""
    return _LEVEL_ORDER.index(level) >= _LEVEL_ORDER.index(required)


def required_isolation(names: Iterable[str]) -> IsolationLevel:
    """The lowest isolation level at which every tool in ``names`` may run (``namespace``
    when none needs more)."""
    needed = [TOOL_ISOLATION[name] for name in names if name in TOOL_ISOLATION]
    return max(needed, key=_LEVEL_ORDER.index, default=IsolationLevel.NAMESPACE)


def check_tool_isolation(names: Iterable[str], level: IsolationLevel) -> None:
    """Refuse tools that need more isolation than ``level``.

    Raises:
        IsolationRequired: a tool needs a higher level (fields ``tool``, ``required``,
            ``isolation_level``); the message names both levels.
    """
    for name in names:
        required = TOOL_ISOLATION.get(name)
        if required is not None and not isolation_allows(level, required):
            raise IsolationRequired(
                f"tool {name!r} needs isolation level {required.value!r} or above "
                f"(it runs model-written code); this tenant's level is {level.value!r}",
                tool=name,
                required=required.value,
                isolation_level=level.value,
            )


def builtin_tools(names: Iterable[str]) -> list[Tool[ToolDeps]]:
    """The prebuilt pydantic-ai tools for ``names`` (validated by :func:`validate_tool_names`).

    Raises:
        UnknownTool: as :func:`validate_tool_names`.
    """
    return [_TOOLS[name] for name in validate_tool_names(names)]
