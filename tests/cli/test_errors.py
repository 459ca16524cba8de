"""Bad input, missing files and unreachable servers end in one ``error:`` line, never a traceback."""

from __future__ import annotations

import gc
import socket
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.cli.conftest import assert_error, cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_output_tokens_below_one_is_refused_by_the_option(acme: str) -> None:
    result = cli("run", "acme", "bot", "hello", "--output-tokens", "0")
    assert_error(result, "--output-tokens", "greater than or equal to 1", exit_code=2)


def test_a_refused_run_prints_the_patinox_error(acme: str) -> None:
    result = cli("run", "acme", "bot", "hello", "--output-tokens", "999999")
    assert_error(result, "error: output_tokens 999999 is above")


def test_missing_admin_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    result = cli("replay", "--admin-key-file", str(missing))
    assert_error(result, f"error: cannot read --admin-key-file {missing}")


def test_replay_without_a_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    result = cli("replay", "--url", url, "--admin-key", "X", "--report", str(tmp_path / "r.json"))
    assert_error(result, f"error: cannot connect to {url}")
    assert not (tmp_path / "r.json").exists()


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """``uvicorn.run`` replaced by a recorder, so a test never serves for real."""
    calls: list[dict[str, object]] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append(kw))
    return calls


@pytest.mark.parametrize(
    ("port", "bound"),
    [("99999", "less than or equal to 65535"), ("0", "greater than or equal to 1"), ("-1", "1")],
)
def test_serve_port_out_of_range(
    data_dir: Path, port: str, bound: str, uvicorn_calls: list[dict[str, object]]
) -> None:
    assert_error(cli("serve", "--port", port), "--port", bound, exit_code=2)
    assert uvicorn_calls == []


def test_serve_on_a_free_port(data_dir: Path, uvicorn_calls: list[dict[str, object]]) -> None:
    port = _free_port()
    result = cli("serve", "--port", str(port))
    assert result.exit_code == 0, result.output
    assert f"on http://127.0.0.1:{port}" in result.output
    assert [c["port"] for c in uvicorn_calls] == [port]


def test_serve_leaves_the_collector_as_it_found_it(
    data_dir: Path, uvicorn_calls: list[dict[str, object]]
) -> None:
    """serve freezes its start-up heap for the server's lifetime only: once uvicorn.run
    returns (in-process callers, such as this suite), nothing stays frozen, so the
    caller's objects -- and serve's own runtime -- can still be collected."""
    assert gc.get_freeze_count() == 0
    result = cli("serve", "--port", str(_free_port()))
    assert result.exit_code == 0, result.output
    assert len(uvicorn_calls) == 1
    assert gc.get_freeze_count() == 0


def test_serve_on_a_busy_port(data_dir: Path, uvicorn_calls: list[dict[str, object]]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("serve", "--port", str(port))
    assert_error(result, f"error: port {port} is in use; choose another with --port")
    assert "serving" not in result.output
    assert uvicorn_calls == []


def test_markup_in_an_argument_is_printed_as_typed(data_dir: Path) -> None:
    assert_error(cli("keys", "create", "[/x]"), "error: no live tenant named '[/x]'")
    assert_error(cli("keys", "create", "[red]acme[/red]"), "'[red]acme[/red]'")


def test_markup_in_an_error_message_is_printed_as_is(acme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("patinox.agents.models._installed", lambda module: False)
    result = cli("agents", "create", "acme", "gpt", "--model", "openai:gpt-4o")
    assert_error(result, "pip install 'patinox[openai]'")


def test_a_key_name_with_markup_is_listed_as_is(acme: str) -> None:
    assert cli("keys", "create", "acme", "--name", "[/x] [bold]k").exit_code == 0
    result = cli("keys", "list", "acme")
    assert result.exit_code == 0, result.output
    assert "[/x] [bold]k" in result.output


def test_no_deployment(tmp_path: Path) -> None:
    assert_error(cli("tenants", "list", "--data-dir", str(tmp_path / "none")), "error: no deployment in")


def test_a_database_error_names_the_drivers_reason(
    pg_admin_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator sees why the database refused (here: a role ``bootstrap`` never made),
    not only the driver's exception class; the KEK file ``init`` had made is gone again."""
    url = make_url(pg_admin_url).set(username="patinox_no_such_role").render_as_string(hide_password=False)
    monkeypatch.setenv("PATINOX_DATABASE_URL", url)
    monkeypatch.setenv("PATINOX_OWNER_URL", url)
    monkeypatch.setenv("PATINOX_KEK_URL", (tmp_path / "kek.json").as_uri())
    result = cli("init")
    assert_error(
        result, "error: database error: OperationalError", 'role "patinox_no_such_role" does not exist'
    )
    assert not (tmp_path / "kek.json").exists()
