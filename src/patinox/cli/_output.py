"""How the CLI speaks: output (JSON, tables, plain lines, progress bars) and errors.

Every failure the user can cause ends in ``error: <message>`` lines on stderr and exit
code 1 (:class:`Group` turns Patinox errors, pydantic ``ValidationError`` and ``OSError``
into them). Text that comes from the user or from an error is never read as Rich markup.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NoReturn

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails, to_jsonable_python
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from patinox.errors import PatinoxError, StorageError

# Tables are wide; when output is not a terminal (CI logs, pipes) do not squeeze them to 80.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


# --- errors ----------------------------------------------------------------------------


def print_errors(lines: Iterable[str]) -> None:
    """Print ``error: <line>`` for each line; the text is never read as markup."""
    for line in lines:
        err_console.print(Text.assemble(("error:", "red"), " ", line), soft_wrap=True)


def error_message(err: PatinoxError) -> str:
    """``err``'s message for the operator's terminal: a :class:`StorageError` adds the first
    line of the driver's own message (e.g. ``role "patinox_owner" does not exist``), which
    the HTTP API keeps to itself (a tenant must not see the database's details)."""
    cause = err.__cause__
    if not isinstance(err, StorageError) or cause is None:
        return err.message
    driver = getattr(cause, "orig", None) or cause
    detail = next((line.strip() for line in str(driver).splitlines() if line.strip()), "")
    return f"{err.message}: {detail}" if detail else err.message


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` and end the command with exit code ``code``.

    Raises:
        typer.Exit: always.
    """
    print_errors([message])
    raise typer.Exit(code)


#: Spec fields named as the CLI spells them (an option or an argument).
_CLI_NAMES = {
    "plan": "--plan",
    "isolation_level": "--isolation-level",
    "storage_model": "--storage-model",
    "model": "--model",
    "instructions": "--instructions",
    "tools": "--tool",
    "output_tokens": "--output-tokens",
    "input": "PROMPT",
}

#: Regular expressions of spec fields, said in words.
_PATTERN_WORDS = {
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*$": "use letters, digits, '_', '.' and '-', starting with a letter or digit",
}


def _problem(e: ErrorDetails) -> str:
    """One pydantic error as a short phrase, e.g. ``must be >= 1``."""
    ctx: dict[str, Any] = dict(e.get("ctx") or {})
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    kind = e["type"]
    if kind in bounds and bounds[kind][1] in ctx:
        op, key = bounds[kind]
        return f"must be {op} {ctx[key]}"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return _PATTERN_WORDS.get(pattern, f"must match {pattern}")
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "string_too_long" and "max_length" in ctx:
        return f"at most {ctx['max_length']} characters"
    return e["msg"].replace("Input should be", "must be")


def validation_lines(err: ValidationError) -> list[str]:
    """One line per problem, each named by the option or argument that carries it."""
    lines = []
    for e in err.errors():
        loc = [str(part) for part in e["loc"]]
        if not loc:
            lines.append(_problem(e))
            continue
        if loc[0] == "limits":
            where = " ".join(["--limit", *loc[1:2]])
        elif loc[0] in _CLI_NAMES:
            where = _CLI_NAMES[loc[0]]
        else:
            where = ".".join(loc)
        lines.append(f"{where}: {_problem(e)}")
    return lines


def _os_error_message(err: OSError) -> str:
    reason = err.strerror or str(err) or type(err).__name__
    return f"{reason}: {err.filename}" if err.filename else reason


# --- commands and groups -----------------------------------------------------------------


def _reflow(help_text: str | None) -> str | None:
    """A docstring's paragraphs each on one line, so Rich wraps them to the terminal
    (Typer keeps the line breaks of every paragraph after the first)."""
    if not help_text:
        return help_text
    paragraphs = inspect.cleandoc(help_text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


class Command(TyperCommand):
    """A command with plain flags and reflowed paragraphs in ``--help``.

    Typer's Rich help prints a ``<bool>`` type after every flag (``--help`` included); a
    flag takes no value, so its type column is left empty.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class Group(TyperGroup):
    """A command group with plain flags in ``--help`` and one error printer.

    Every :class:`~patinox.errors.PatinoxError`, pydantic ``ValidationError`` and
    ``OSError`` raised by a subcommand ends as ``error: <message>`` lines and exit code 1.
    """

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except PatinoxError as err:
            fail(error_message(err))
        except ValidationError as err:
            print_errors(validation_lines(err))
            raise typer.Exit(1) from None
        except OSError as err:
            fail(_os_error_message(err))


def _plain_flags(params: list[Any]) -> list[Any]:
    # Typer's context and parameter classes come from its private copy of click
    # (typer._click): they are typed ``Any`` here rather than named from a private module.
    for param in params:
        if getattr(param, "is_bool_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


# --- output ------------------------------------------------------------------------------


def show(data: BaseModel | dict[str, Any]) -> None:
    """Print ``data`` as JSON, serialised the way the HTTP API does (timestamps ``...Z``)."""
    payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else to_jsonable_python(data)
    console.print_json(json.dumps(payload))


def say(message: str) -> None:
    """Print a line of plain text (never read as markup)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def cells(*values: object) -> list[Text]:
    """Table cells that show their text as it is (no markup)."""
    return [Text(str(v)) for v in values]


def utc(value: datetime) -> str:
    """A timestamp for a table cell: UTC, to the second, like the JSON (``...Z``)."""
    return f"{value.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar; yields ``update(done, total)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
