"""Built-in tools: the calculator's safety, the clock, tool name validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from patinox.agents import BUILTIN_TOOLS, CalculatorError, calculator, validate_tool_names
from patinox.agents.tools import MAX_INT_BITS, current_time
from patinox.errors import UnknownTool


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2*(3+4)", 14),
        ("1 + 2 * 3", 7),
        ("-3**2", -9),
        ("(-3)**2", 9),
        ("--4", 4),
        ("+4", 4),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("1 / 4", 0.25),
        ("2 ** -1", 0.5),
        ("(1.5 + 2.5) * 2", 8.0),
        ("1e3 / 8", 125.0),
        ("2 ** 4000", 2**4000),
        ("  10 - 20  ", -10),
    ],
)
def test_arithmetic(expression: str, value: float) -> None:
    result = calculator(expression)
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "().__class__.__bases__",
        "(1).real",
        "x",
        "x + 1",
        "abs(-1)",
        "'a' * 3",
        "b'a'",
        "[1, 2]",
        "(1, 2)",
        "{1: 2}",
        "1 if 1 else 2",
        "1 < 2",
        "1 and 2",
        "True + 1",
        "None",
        "1j",
        "1 << 3",
        "6 & 3",
        "~1",
        "not 1",
        "lambda: 1",
        "[x for x in (1,)]",
        "(y := 2)",
        "f'{1}'",
        "...",
        "1; 2",
        "import os",
        "",
    ],
)
def test_refuses_everything_but_arithmetic(expression: str) -> None:
    with pytest.raises(CalculatorError):
        calculator(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "2 ** 100000",
        "9 ** 9 ** 9",
        "10 ** 10 ** 10",
        "(2 ** 4000) * (2 ** 4000)",
        "2 ** 4000 * 2 ** 4000 * 2 ** 4000",
        "2.0 ** 5000",
        "1e308 * 10",
        "10 ** 400.0",
        "(2 ** 4000) / 3.0 ** -1000",
        "1.0000001 ** 10 ** 9",
        "(-8) ** 0.5",
        "1 / 0",
        "1 // 0",
        "1 % 0",
        "0 ** -1",
        "9" * 1500,
        "1" + "+1" * 600,
        "-" * 500 + "1",
        "(" * 300 + "1" + ")" * 300,
    ],
)
def test_refuses_huge_or_undefined_results(expression: str) -> None:
    with pytest.raises(CalculatorError):
        calculator(expression)


def test_refuses_long_expressions_before_parsing() -> None:
    with pytest.raises(CalculatorError, match="longer than"):
        calculator("1" + " " * 1_000)


def test_integer_bound_is_exact_enough() -> None:
    assert calculator(f"2 ** {MAX_INT_BITS - 1}") == 2 ** (MAX_INT_BITS - 1)
    with pytest.raises(CalculatorError):
        calculator(f"2 ** {MAX_INT_BITS}")


def test_calculator_never_evaluates_python(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("eval/exec must not be used")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert calculator("1 + 1") == 2


async def test_current_time_is_utc_iso8601() -> None:
    stamp = await current_time()
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - parsed) < timedelta(seconds=60)


def test_builtin_tool_names() -> None:
    assert (
        frozenset(
            {"memory_get", "memory_put", "memory_list", "calculator", "current_time", "python", "http_fetch"}
        )
        == BUILTIN_TOOLS
    )


def test_validate_tool_names_keeps_order() -> None:
    assert validate_tool_names(["calculator", "memory_get"]) == ("calculator", "memory_get")
    assert validate_tool_names([]) == ()


@pytest.mark.parametrize(
    "names",
    [["shell"], ["calculator", "Calculator"], ["memory_get", "memory_get"], [""]],
)
def test_validate_tool_names_refuses_unknown_and_duplicates(names: list[str]) -> None:
    with pytest.raises(UnknownTool) as info:
        validate_tool_names(names)
    assert info.value.fields["tool"] in names
