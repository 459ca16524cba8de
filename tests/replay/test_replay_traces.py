"""Trace loaders: Azure CSV parsing, ServeGen sampling, bundled data lookup."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pytest

import patinox.replay
from patinox.errors import ConfigurationError
from patinox.replay import (
    AZURE_FILES,
    SERVEGEN_WINDOW_S,
    TRACES_DIR_ENV,
    TraceRequest,
    default_traces_dir,
    list_traces,
    load_azure,
    load_servegen,
    load_trace,
    servegen_clients,
)
from patinox.replay.traces import _find_traces_dir, _parse_timestamp_ns

PUBLIC_API = [
    "ACCOUNTING",
    "AZURE_FILES",
    "PERCENTILE_METHOD",
    "SERVEGEN_WINDOW_S",
    "TRACES_DIR_ENV",
    "BundledTrace",
    "ProgressCallback",
    "ReplayBounds",
    "ReplayProgress",
    "ReplayReport",
    "TenantHandle",
    "TenantReport",
    "TraceRequest",
    "default_traces_dir",
    "list_traces",
    "load_azure",
    "load_servegen",
    "load_trace",
    "onboard",
    "percentile",
    "prompt_of",
    "render_table",
    "replay",
    "servegen_clients",
]


def test_public_api_is_pinned() -> None:
    assert patinox.replay.__all__ == PUBLIC_API
    for name in PUBLIC_API:
        assert hasattr(patinox.replay, name)


# --- Azure ------------------------------------------------------------------------------

AZURE_CSV = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:17:03.9799600,4808,10\n"
    "2023-11-16 18:17:04.0319600,3180,8\n"
    "2023-11-16 18:17:05.9799601,1,1\n"
    "2023-11-16 18:17:13.9799600,5,0"  # no final newline, like the published files
)


@pytest.fixture
def azure_csv(tmp_path: Path) -> Path:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_CSV, encoding="utf-8")
    return path


def test_azure_offsets_are_relative_to_first_row_to_the_100ns(azure_csv: Path) -> None:
    requests = load_azure(azure_csv, source="azure-code", duration_s=None)
    assert [r.offset_s for r in requests] == pytest.approx([0.0, 0.052, 2.0000001, 10.0], abs=1e-9)
    assert requests[0] == TraceRequest(
        source="azure-code", offset_s=0.0, prompt_tokens=4808, output_tokens=10
    )
    assert {r.source for r in requests} == {"azure-code"}


def test_azure_duration_keeps_offsets_strictly_below(azure_csv: Path) -> None:
    requests = load_azure(azure_csv, source="azure-code", duration_s=10.0)
    assert [r.prompt_tokens for r in requests] == [4808, 3180, 1]
    assert load_azure(azure_csv, source="x", duration_s=10.0 + 1e-6)[-1].prompt_tokens == 5


def test_azure_zero_tokens_are_raised_to_one(azure_csv: Path) -> None:
    last = load_azure(azure_csv, source="azure-code", duration_s=None)[-1]
    assert last.output_tokens == 1


def test_azure_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9799600,4808\n")
    with pytest.raises(ValueError, match="GeneratedTokens"):
        load_azure(path, source="azure-code", duration_s=None)


def test_azure_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,1,1\nyesterday,1,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3"):
        load_azure(path, source="azure-code", duration_s=None)


@pytest.mark.parametrize(
    ("text", "expected_ns"),
    [
        ("1970-01-01 00:00:01.0000001", 1_000_000_100),
        ("1970-01-01T00:00:01.0000001Z", 1_000_000_100),
        ("1970-01-01 00:00:01", 1_000_000_000),
        ("1970-01-01 00:00:01.123456789123", 1_123_456_789),
        ("1970-01-01 01:00:01.5+01:00", 1_500_000_000),
        ("  1970-01-01 00:00:02.25  ", 2_250_000_000),
    ],
)
def test_timestamp_parsing_is_robust(text: str, expected_ns: int) -> None:
    assert _parse_timestamp_ns(text) == expected_ns


def test_bundled_azure_first_minute() -> None:
    folder = default_traces_dir() / "azure-llm-2023"
    code = load_azure(folder / AZURE_FILES["azure-code"], source="azure-code", duration_s=60)
    conv = load_azure(folder / AZURE_FILES["azure-conv"], source="azure-conv", duration_s=60)
    assert (len(code), len(conv)) == (63, 191)
    for requests in (code, conv):
        assert requests[0].offset_s == 0.0
        offsets = [r.offset_s for r in requests]
        assert offsets == sorted(offsets)
        assert offsets[-1] < 60


# --- ServeGen ---------------------------------------------------------------------------


def _pmf(d: dict[int, float]) -> str:
    return repr(d)


@pytest.fixture
def servegen_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "servegen"
    folder.mkdir()
    (folder / "chunk-7-trace.csv").write_text(
        "0,0,0,,0,0\n"
        "600,5.0,1.0,Gamma,1.0,0.2\n"
        "1200,2.0,0.5,Weibull,1.5,0.5\n"
        "1800,3.0,2.0,Gamma,0.25,1.3333333333333333\n"
    )
    (folder / "chunk-7-dataset.json").write_text(
        json.dumps(
            {
                "0": {
                    "input_tokens": _pmf({10: 0.5, 20: 0.5, 30: 0.0}),
                    "output_tokens": _pmf({0: 0.5, 5: 0.5}),
                    "reason_ratio": "{}",
                },
                "1200": {"input_tokens": "{}", "output_tokens": "{}", "reason_ratio": "{}"},
                "1800": {
                    "input_tokens": _pmf({1000: 1.0}),
                    "output_tokens": _pmf({7: 1.0}),
                    "reason_ratio": "{}",
                },
            }
        )
    )
    (folder / "chunk-12-trace.csv").write_text("0,1.0,1.0,Gamma,1.0,1.0\n")
    (folder / "chunk-12-dataset.json").write_text(
        json.dumps({"0": {"input_tokens": "{3: 1.0}", "output_tokens": "{4: 1.0}"}})
    )
    return folder


def test_servegen_clients_are_listed_numerically(servegen_dir: Path) -> None:
    assert servegen_clients(servegen_dir) == ["7", "12"]


def test_servegen_is_deterministic_per_seed(servegen_dir: Path) -> None:
    def load(seed: int) -> list[TraceRequest]:
        return load_servegen(servegen_dir, clients=None, start_s=0, duration_s=2400, seed=seed)

    assert load(1) == load(1)
    assert load(1) != load(2)


def test_servegen_sources_offsets_and_order(servegen_dir: Path) -> None:
    requests = load_servegen(servegen_dir, clients=None, start_s=300, duration_s=600, seed=3)
    assert {r.source for r in requests} == {"servegen-7", "servegen-12"}
    keys = [(r.offset_s, r.source) for r in requests]
    assert keys == sorted(keys)
    assert all(0 <= r.offset_s < 600 for r in requests)
    # client 7 is silent in [0, 600): its requests start at trace second 600 = offset 300
    assert min(r.offset_s for r in requests if r.source == "servegen-7") >= 300


def test_servegen_rate_zero_window_has_no_requests(servegen_dir: Path) -> None:
    assert load_servegen(servegen_dir, clients=["7"], start_s=0, duration_s=600, seed=0) == []


def test_servegen_rate_matches_window_rate(servegen_dir: Path) -> None:
    for seed in range(3):
        requests = load_servegen(servegen_dir, clients=["7"], start_s=600, duration_s=600, seed=seed)
        expected = 5.0 * SERVEGEN_WINDOW_S
        assert 0.8 * expected <= len(requests) <= 1.2 * expected


def test_servegen_tokens_come_from_the_window_support(servegen_dir: Path) -> None:
    requests = load_servegen(servegen_dir, clients=["7"], start_s=600, duration_s=1800, seed=5)
    early = [r for r in requests if r.offset_s < 1200]  # windows 600 and 1200 (empty -> "0")
    late = [r for r in requests if r.offset_s >= 1200]  # window 1800 has its own entry
    assert early and late
    assert {r.prompt_tokens for r in early} == {10, 20}  # 30 has probability 0
    assert {r.output_tokens for r in early} == {1, 5}  # 0 is clamped to 1
    assert {(r.prompt_tokens, r.output_tokens) for r in late} == {(1000, 7)}


def test_servegen_shorter_range_is_a_slice_of_a_longer_one(servegen_dir: Path) -> None:
    long = load_servegen(servegen_dir, clients=None, start_s=0, duration_s=2400, seed=9)
    short = load_servegen(servegen_dir, clients=None, start_s=900, duration_s=700, seed=9)
    sliced = [
        (r.source, r.offset_s - 900, r.prompt_tokens, r.output_tokens)
        for r in long
        if 900 <= r.offset_s < 1600
    ]
    got = [(r.source, r.offset_s, r.prompt_tokens, r.output_tokens) for r in short]
    assert [g[0::2] for g in got] == [s[0::2] for s in sliced]
    assert [g[1] for g in got] == pytest.approx([s[1] for s in sliced], abs=1e-9)


def test_servegen_unknown_client_is_refused(servegen_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="99"):
        load_servegen(servegen_dir, clients=["99"], start_s=0, duration_s=600, seed=0)


def test_servegen_bad_range_is_refused(servegen_dir: Path) -> None:
    with pytest.raises(ConfigurationError):
        load_servegen(servegen_dir, clients=None, start_s=0, duration_s=0, seed=0)


def _busiest_moderate_gamma_window(folder: Path) -> tuple[str, float, float]:
    """(client, window start s, rate req/s) of the busiest Gamma row with cv <= 2."""
    best: tuple[str, float, float] = ("", 0.0, 0.0)
    for client in servegen_clients(folder):
        with (folder / f"chunk-{client}-trace.csv").open() as handle:
            for row in csv.reader(handle):
                rate, cv = float(row[1]), float(row[2])
                if row[3] == "Gamma" and cv <= 2 and rate > best[2]:
                    best = (client, float(row[0]), rate)
    return best


def test_bundled_servegen_rate_and_support() -> None:
    folder = default_traces_dir() / "servegen-deepseek-r1"
    client, start, rate = _busiest_moderate_gamma_window(folder)
    requests = load_servegen(folder, clients=[client], start_s=start, duration_s=600, seed=0)
    expected = rate * SERVEGEN_WINDOW_S
    assert 0.75 * expected <= len(requests) <= 1.25 * expected

    dataset = json.loads((folder / f"chunk-{client}-dataset.json").read_text())
    starts = sorted(float(k) for k in dataset)
    support: dict[str, set[int]] = {}
    for name in ("input_tokens", "output_tokens"):
        for key in reversed([s for s in starts if s <= start]):
            pmf = ast.literal_eval(dataset[f"{key:g}"][name])
            if pmf:
                support[name] = {max(1, int(v)) for v, p in pmf.items() if p > 0}
                break
    assert {r.prompt_tokens for r in requests} <= support["input_tokens"]
    assert {r.output_tokens for r in requests} <= support["output_tokens"]


# --- bundled data lookup ----------------------------------------------------------------


def test_traces_dir_env_var_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(TRACES_DIR_ENV, str(tmp_path))
    assert default_traces_dir() == tmp_path
    assert list_traces() == []


def test_traces_dir_env_var_to_missing_folder_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(TRACES_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(ConfigurationError, match=TRACES_DIR_ENV):
        default_traces_dir()


def test_traces_dir_found_by_walking_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(TRACES_DIR_ENV, raising=False)
    assert (default_traces_dir() / "azure-llm-2023").is_dir()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert _find_traces_dir(deep) is None
    (tmp_path / "data" / "traces").mkdir(parents=True)
    assert _find_traces_dir(deep) == tmp_path / "data" / "traces"


def test_list_traces_describes_the_bundled_datasets() -> None:
    traces = {t.name: t for t in list_traces()}
    assert traces["azure-llm-2023"].sources == ("azure-code", "azure-conv")
    servegen = traces["servegen-deepseek-r1"]
    assert len(servegen.sources) == 73
    assert servegen.sources[:3] == ("servegen-0", "servegen-1", "servegen-2")


def test_load_trace_by_name() -> None:
    both = load_trace("azure-llm-2023", duration_s=60)
    assert len(both) == 63 + 191
    assert [r.offset_s for r in both] == sorted(r.offset_s for r in both)
    assert len(load_trace("azure-llm-2023", sources=["azure-conv"], duration_s=60)) == 191
    sampled = load_trace(
        "servegen-deepseek-r1", sources=["servegen-35"], start_s=43200, duration_s=60, seed=1
    )
    assert sampled and {r.source for r in sampled} == {"servegen-35"}
    with pytest.raises(ConfigurationError, match="unknown trace"):
        load_trace("nope")
    with pytest.raises(ConfigurationError, match="servegen-35"):
        load_trace("azure-llm-2023", sources=["servegen-35"])
    with pytest.raises(ConfigurationError, match="start_s"):
        load_trace("azure-llm-2023", start_s=10)


def test_trace_request_is_validated() -> None:
    with pytest.raises(ValueError):
        TraceRequest(source="a", offset_s=-1.0, prompt_tokens=1, output_tokens=1)
    with pytest.raises(ValueError):
        TraceRequest(source="a", offset_s=0.0, prompt_tokens=0, output_tokens=1)
