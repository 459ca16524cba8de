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
- ``http_fetch(url)`` -> ``{"status", "content_type", "body", "url"}``: one ``GET`` made on
  the host through the run's :class:`HttpFetcher` (the deployment's outbound-request guard,
  :mod:`patinox.network.outbound`), only to hosts on the tenant's ``egress_hosts``
  allow-list; an execution process asks the host over its channel, the sandbox itself has
  no network. ``body`` is the response text (UTF-8, undecodable bytes replaced) of at most
  the deployment's response cap. A refused URL (host not allowed, a loopback, private or
  link-local address, a redirect to one) or a failed request is a failed tool result: the
  model is told why and the run goes on.

Tool plugins: tools beyond the built-ins come from Python packages that declare an entry
point in the group ``patinox.tools`` (:data:`TOOL_ENTRY_POINT_GROUP`): the entry point's name
is the tool's, its object a :class:`pydantic_ai.Tool` or a plain async or sync function
(:func:`tool_plugins`). A tenant's agents may name only the tools on its ``allowed_tools``
list (plan, then tenant override; ``None``: every installed tool), checked when an agent is
defined and again when its run starts and executes (:func:`check_tools_allowed`).

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
import importlib
import importlib.metadata
import inspect
import logging
import math
import operator
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, ParamSpec, Protocol, TypeVar

from pydantic_ai import RunContext, Tool
from pydantic_ai.exceptions import ModelRetry, ToolFailed

from patinox.agents.simulated import count_simulated_tokens
from patinox.errors import (
    EgressRefused,
    InvalidRequest,
    IsolationRequired,
    OutboundFailed,
    ToolNotAllowed,
    UnknownTool,
)
from patinox.tenancy import IsolationLevel

__all__ = [
    "BUILTIN_TOOLS",
    "MAX_EXPRESSION_CHARS",
    "MAX_INT_BITS",
    "MEMORY_LIST_LIMIT",
    "TOOL_ENTRY_POINT_GROUP",
    "TOOL_ISOLATION",
    "CalculatorError",
    "CodeResult",
    "CodeRunner",
    "FetchedPage",
    "HttpFetcher",
    "MemoryStore",
    "ToolDeps",
    "ToolExecutionError",
    "ToolLimitReached",
    "builtin_tools",
    "calculator",
    "check_tool_isolation",
    "check_tools_allowed",
    "isolation_allows",
    "known_tools",
    "refresh_tool_plugins",
    "required_isolation",
    "tool_plugins",
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
class FetchedPage:
    """What one ``http_fetch`` call got (after redirects).

    Attributes:
        status: the HTTP status of the final response.
        content_type: its ``Content-Type`` (empty when it sent none).
        body: its body as text (UTF-8, undecodable bytes replaced), at most the
            deployment's response cap in bytes.
        url: the URL that answered (without user-info or query).
    """

    status: int
    content_type: str
    body: str
    url: str


class HttpFetcher(Protocol):
    """Makes the ``http_fetch`` tool's requests for one tenant, on the host: through the
    outbound-request guard, under the tenant's egress allow-list
    (:class:`patinox.isolation.egress.GuardedFetcher`, or an execution process's channel to
    the host)."""

    async def fetch(self, url: str) -> FetchedPage:
        """``GET url``.

        Raises:
            EgressRefused: the URL, its host, an address or a redirect's target is not
                allowed (field ``reason``).
            OutboundFailed: it was allowed but failed (connection, TLS, time, size).
        """
        ...


@dataclass(frozen=True, kw_only=True)
class ToolDeps:
    """What tools of one run can reach (pydantic-ai ``deps``).

    Attributes:
        memory: the tenant-bound memory store of the run.
        code: the runner of the ``python`` tool; ``None`` below the ``container`` level,
            where a call of it ends the run (``tool_error``).
        fetch: the ``http_fetch`` tool's requests, bound to the run's tenant's egress
            policy; ``None``: no egress in this run (each call is a failed tool result).
    """

    memory: MemoryStore
    code: CodeRunner | None = None
    fetch: HttpFetcher | None = None


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


@_tool_boundary("http_fetch")
async def http_fetch(ctx: RunContext[ToolDeps], url: str) -> dict[str, str | int]:
    """Fetch a web page or API response with GET. Only hosts on the tenant's egress
    allow-list can be reached.

    Args:
        url: the URL, e.g. "https://api.example.com/v1/status".

    Returns:
        {"status", "content_type", "body", "url"}: the HTTP status, the content type, the
        body as text (cut at the deployment's size cap) and the URL that answered.
    """
    fetcher = ctx.deps.fetch
    if fetcher is None:
        raise ToolFailed("this run has no egress: no request was made")
    try:
        page = await fetcher.fetch(url)
    except (EgressRefused, OutboundFailed) as err:
        raise ToolFailed(err.message) from err
    _fits_budget(ctx, "http_fetch", (page.body,))
    return {"status": page.status, "content_type": page.content_type, "body": page.body, "url": page.url}


_TOOLS: Final[Mapping[str, Tool[ToolDeps]]] = {
    "memory_get": Tool(memory_get, takes_ctx=True, name="memory_get"),
    "memory_put": Tool(memory_put, takes_ctx=True, name="memory_put"),
    "memory_list": Tool(memory_list, takes_ctx=True, name="memory_list"),
    "calculator": Tool(calculator_tool, takes_ctx=False, name="calculator"),
    "current_time": Tool(current_time, takes_ctx=False, name="current_time"),
    "python": Tool(python_tool, takes_ctx=True, name="python"),
    "http_fetch": Tool(http_fetch, takes_ctx=True, name="http_fetch"),
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
        UnknownTool: a name is neither a built-in tool nor an installed plugin's, or appears
            twice (fields ``tool``, ``known``).
    """
    known = known_tools()
    seen: list[str] = []
    for name in names:
        if name not in known:
            raise UnknownTool(
                f"unknown tool {name!r}; known tools: {', '.join(sorted(known))}",
                tool=name,
                known=sorted(known),
            )
        if name in seen:
            raise UnknownTool(f"tool {name!r} listed twice", tool=name, known=sorted(known))
        seen.append(name)
    return tuple(seen)


def check_tools_allowed(names: Iterable[str], allowed: Iterable[str] | None) -> None:
    """Refuse tools the tenant's allow-list leaves out.

    Args:
        names: the agent's tools.
        allowed: the tenant's effective ``allowed_tools`` (``None``: every installed tool).

    Raises:
        ToolNotAllowed: a tool is not on the list (403 ``tool_not_allowed``; fields
            ``tool``, ``allowed``).
    """
    if allowed is None:
        return
    permitted = set(allowed)
    for name in names:
        if name not in permitted:
            raise ToolNotAllowed(
                f"tool {name!r} is not on this tenant's tool allow-list "
                f"({', '.join(sorted(permitted)) or 'empty'})",
                tool=name,
                allowed=sorted(permitted),
            )


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
    plugins = tool_plugins()
    return [_TOOLS.get(name) or plugins[name] for name in validate_tool_names(names)]


# --- tool plugins ---------------------------------------------------------------------------

TOOL_ENTRY_POINT_GROUP: Final = "patinox.tools"
"""The entry-point group tool packages declare their tools in (``[project.entry-points."patinox.tools"]``
``weather = "acme_tools:weather"``)."""

_plugins_lock = threading.Lock()
_plugins: dict[str, Tool[ToolDeps]] | None = None


def tool_plugins() -> Mapping[str, Tool[ToolDeps]]:
    """The installed plugins' tools by name, discovered once per process through the entry
    points of :data:`TOOL_ENTRY_POINT_GROUP` (:mod:`importlib.metadata`).

    Each entry point's object is a :class:`pydantic_ai.Tool` (its name must be the entry
    point's) or a function (its docstring and annotations describe it to the model), made a
    tool of that name; pydantic-ai runs a plain (not async) function in a worker thread. A
    tool's unexpected exception ends the run (``tool_error``), as a built-in's does. A name
    a built-in tool has, an entry point that does not load, or an object that is neither is
    left out and logged, so one broken package cannot take every run down.
    """
    global _plugins
    with _plugins_lock:
        if _plugins is None:
            _plugins = _discover()
        return _plugins


def refresh_tool_plugins() -> Mapping[str, Tool[ToolDeps]]:
    """Discover the plugins again (after packages were installed into the running process)."""
    global _plugins
    importlib.invalidate_caches()
    with _plugins_lock:
        _plugins = _discover()
        return _plugins


def known_tools() -> frozenset[str]:
    """Every tool an agent may name on this deployment: the built-ins and the plugins'."""
    return BUILTIN_TOOLS | frozenset(tool_plugins())


def _discover() -> dict[str, Tool[ToolDeps]]:
    log = logging.getLogger(__name__)
    found: dict[str, Tool[ToolDeps]] = {}
    for entry in importlib.metadata.entry_points(group=TOOL_ENTRY_POINT_GROUP):
        name = entry.name
        if name in BUILTIN_TOOLS or name in found:
            log.warning("tool plugin %r (%s) left out: the name is taken", name, entry.value)
            continue
        try:
            obj = entry.load()
        except Exception as err:
            log.warning("tool plugin %r (%s) left out: it does not load: %r", name, entry.value, err)
            continue
        if isinstance(obj, Tool):
            if obj.name != name:
                log.warning("tool plugin %r left out: its Tool is named %r", name, obj.name)
                continue
            found[name] = obj
        elif inspect.iscoroutinefunction(obj):
            found[name] = Tool(_tool_boundary(name)(obj), takes_ctx=False, name=name)
        elif callable(obj):
            found[name] = Tool(_sync_boundary(name, obj), takes_ctx=False, name=name)
        else:
            log.warning("tool plugin %r left out: %r is neither a Tool nor a function", name, obj)
    return found


def _sync_boundary(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A plugin's plain function with the boundary of :func:`_tool_boundary`, still a plain
    function: pydantic-ai runs it in a worker thread, so a slow plugin does not hold up the
    event loop (and the other tenants' runs on it)."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (ModelRetry, ToolFailed):
            raise
        except Exception as exc:
            raise ToolExecutionError(name) from exc

    return call
