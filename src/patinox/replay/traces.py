"""Public LLM inference traces, read into one request shape for replay.

Two bundled datasets (see ``data/traces/README.md`` for source, commit and licence):

- ``azure-llm-2023``: the Azure LLM inference trace 2023, two CSV files that are two
  real services. Each file becomes one tenant source: ``azure-code`` and ``azure-conv``.
- ``servegen-deepseek-r1``: Alibaba ServeGen per-client statistics of a reasoning model
  over one day. Each client becomes one tenant source ``servegen-<client>``; arrivals and
  token counts are *sampled* from the per-window statistics, deterministically for a seed.

Every loader returns :class:`TraceRequest` records sorted by ``offset_s``.
"""

from __future__ import annotations

import ast
import bisect
import csv
import itertools
import json
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from patinox.errors import ConfigurationError

__all__ = [
    "AZURE_FILES",
    "SERVEGEN_WINDOW_S",
    "TRACES_DIR_ENV",
    "BundledTrace",
    "TraceRequest",
    "default_traces_dir",
    "list_traces",
    "load_azure",
    "load_servegen",
    "load_trace",
    "servegen_clients",
]

TRACES_DIR_ENV = "PATINOX_TRACES_DIR"
"""Environment variable naming the folder that holds the bundled traces."""

SERVEGEN_WINDOW_S = 600.0
"""Length of one ServeGen statistics window, seconds (10 minutes, as published)."""

AZURE_DATASET = "azure-llm-2023"
SERVEGEN_DATASET = "servegen-deepseek-r1"

AZURE_FILES: dict[str, str] = {
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
}
"""Tenant source name -> file name inside ``azure-llm-2023/``."""

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# Both matched whole (``fullmatch``: ``$`` would also match before a final newline), with
# ASCII digits only.
_TIMESTAMP = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[ T](?P<time>\d{2}:\d{2}:\d{2})"
    r"(?:\.(?P<frac>\d+))?\s*(?P<tz>Z|[+-]\d{2}:?\d{2})?",
    re.ASCII,
)
_SERVEGEN_TRACE = re.compile(r"chunk-(?P<client>[^/]+)-trace\.csv")


@dataclass(frozen=True, kw_only=True, slots=True)
class TraceRequest:
    """One request of a trace, as the replay sends it.

    Attributes:
        source: tenant source name, e.g. ``"azure-code"`` or ``"servegen-35"``; the
            replay runs each source as its own tenant.
        offset_s: seconds since the start of the trace (the first request of an Azure
            file; ``start_s`` for ServeGen), >= 0.
        prompt_tokens: prompt length, tokens (>= 1).
        output_tokens: completion length, tokens (>= 1).
    """

    source: str
    offset_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("TraceRequest.source must be a non-empty string")
        if not (math.isfinite(self.offset_s) and self.offset_s >= 0):
            raise ValueError(f"TraceRequest.offset_s must be finite and >= 0, not {self.offset_s}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(
                "TraceRequest token counts must be >= 1, not "
                f"prompt={self.prompt_tokens} output={self.output_tokens}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class BundledTrace:
    """A dataset shipped in ``data/traces``.

    Attributes:
        name: dataset name accepted by :func:`load_trace`.
        kind: which loader reads it.
        path: its folder.
        sources: the tenant sources it holds, in a stable order.
        description: one line for humans (rates are as published).
    """

    name: str
    kind: Literal["azure", "servegen"]
    path: Path
    sources: tuple[str, ...]
    description: str


# --- where the data lives ---------------------------------------------------------------


def _find_traces_dir(start: Path) -> Path | None:
    """The first ``data/traces`` folder in ``start`` or one of its parents, or None."""
    for folder in (start, *start.parents):
        candidate = folder / "data" / "traces"
        if candidate.is_dir():
            return candidate
    return None


def default_traces_dir() -> Path:
    """The folder holding the bundled traces.

    ``$PATINOX_TRACES_DIR`` wins when set; otherwise the first ``data/traces`` found by
    walking up from this file (a source checkout has it at the repository root).

    Returns:
        An existing directory.

    Raises:
        ConfigurationError: the variable names a missing folder, or no ``data/traces`` was
            found (the message says to set ``PATINOX_TRACES_DIR``).
    """
    configured = os.environ.get(TRACES_DIR_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise ConfigurationError(
                f"{TRACES_DIR_ENV}={configured!r} is not a directory; point it at the folder "
                f"holding {AZURE_DATASET}/ and {SERVEGEN_DATASET}/",
                env=TRACES_DIR_ENV,
            )
        return path
    found = _find_traces_dir(Path(__file__).resolve().parent)
    if found is None:
        raise ConfigurationError(
            "bundled traces not found: no data/traces above "
            f"{Path(__file__).resolve().parent}; set {TRACES_DIR_ENV} to the folder holding "
            f"{AZURE_DATASET}/ and {SERVEGEN_DATASET}/ (data/traces in a clone of the repository)",
            env=TRACES_DIR_ENV,
        )
    return found


def servegen_clients(folder: str | os.PathLike[str]) -> list[str]:
    """Client ids of a ServeGen folder (one per ``chunk-<client>-trace.csv``).

    Returns:
        Client ids as strings, numeric ones in numeric order.
    """
    names = (_SERVEGEN_TRACE.fullmatch(p.name) for p in Path(folder).iterdir())
    clients = [m["client"] for m in names if m is not None]
    return sorted(clients, key=lambda c: (0, int(c), c) if c.isdigit() else (1, 0, c))


def list_traces(data_dir: str | os.PathLike[str] | None = None) -> list[BundledTrace]:
    """The bundled datasets that are present.

    Args:
        data_dir: folder holding the datasets; :func:`default_traces_dir` when None.

    Returns:
        One :class:`BundledTrace` per dataset found (missing ones are left out).

    Raises:
        ConfigurationError: ``data_dir`` is None and no traces folder can be found.
    """
    root = Path(data_dir) if data_dir is not None else default_traces_dir()
    found: list[BundledTrace] = []
    azure = root / AZURE_DATASET
    azure_sources = tuple(s for s, f in AZURE_FILES.items() if (azure / f).is_file())
    if azure_sources:
        found.append(
            BundledTrace(
                name=AZURE_DATASET,
                kind="azure",
                path=azure,
                sources=azure_sources,
                description="Azure LLM inference 2023: code ~2.6 req/s, conv ~5.5 req/s, 1 h",
            )
        )
    servegen = root / SERVEGEN_DATASET
    if servegen.is_dir():
        clients = servegen_clients(servegen)
        if clients:
            found.append(
                BundledTrace(
                    name=SERVEGEN_DATASET,
                    kind="servegen",
                    path=servegen,
                    sources=tuple(f"servegen-{c}" for c in clients),
                    description=f"ServeGen DeepSeek-R1: {len(clients)} clients, one day, sampled",
                )
            )
    return found


# --- Azure ------------------------------------------------------------------------------


def _parse_timestamp_ns(text: str) -> int:
    """Nanoseconds since the Unix epoch of an Azure ``TIMESTAMP``.

    Accepts ``YYYY-MM-DD HH:MM:SS[.fraction]`` with any number of fraction digits (the
    trace has 7, more than :mod:`datetime` keeps), a ``T`` separator and an optional
    ``Z``/``+HH:MM`` suffix; without a suffix the time is UTC.

    Raises:
        ValueError: the text is not such a timestamp.
    """
    match = _TIMESTAMP.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a timestamp: {text!r}")
    base = datetime.fromisoformat(f"{match['date']}T{match['time']}").replace(tzinfo=UTC)
    tz = match["tz"]
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        base -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    frac = (match["frac"] or "")[:9].ljust(9, "0")
    seconds = int((base - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
    return seconds * 1_000_000_000 + int(frac)


def _azure_rows(path: Path) -> Iterator[tuple[int, int, int]]:
    """(timestamp ns, prompt tokens, output tokens) per data row of an Azure CSV."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        header = {name.strip() for name in reader.fieldnames or ()}
        missing = [c for c in _AZURE_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {_AZURE_COLUMNS}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not any(row.values()):
                continue
            try:
                yield (
                    _parse_timestamp_ns(row["TIMESTAMP"]),
                    int(row["ContextTokens"]),
                    int(row["GeneratedTokens"]),
                )
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: {exc}") from exc


def load_azure(path: str | os.PathLike[str], *, source: str, duration_s: float | None) -> list[TraceRequest]:
    """Read one Azure LLM inference trace file.

    Args:
        path: a CSV with columns ``TIMESTAMP`` (UTC, 7 decimal places),
            ``ContextTokens`` and ``GeneratedTokens``.
        source: tenant source name given to every request, e.g. ``"azure-code"``.
        duration_s: keep only requests with ``offset_s < duration_s`` (seconds); all
            when None.

    Returns:
        Requests sorted by ``offset_s``, which is seconds since the file's first
        (earliest) row, exact to the nanosecond before conversion to float. Token counts
        below 1 (none in the published files) are raised to 1 so every request is
        replayable.

    Raises:
        ValueError: a missing column or a malformed row (file and line named).
        OSError: the file cannot be read.
    """
    rows = list(_azure_rows(Path(path)))
    if not rows:
        return []
    first_ns = min(ts for ts, _, _ in rows)
    requests = [
        TraceRequest(
            source=source,
            offset_s=(ts - first_ns) / 1e9,
            prompt_tokens=max(1, prompt),
            output_tokens=max(1, output),
        )
        for ts, prompt, output in rows
    ]
    if duration_s is not None:
        requests = [r for r in requests if r.offset_s < duration_s]
    requests.sort(key=lambda r: r.offset_s)
    return requests


# --- ServeGen ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Window:
    start_s: float
    rate: float  # requests per second
    cv: float  # coefficient of variation of inter-arrival times
    dist: str


@dataclass(frozen=True, slots=True)
class _Pmf:
    """A discrete distribution ready for :meth:`random.Random.choices`."""

    values: tuple[int, ...]
    cum_weights: tuple[float, ...]

    def sample(self, rng: random.Random) -> int:
        return rng.choices(self.values, cum_weights=self.cum_weights, k=1)[0]


def _read_windows(path: Path) -> list[_Window]:
    """Rows of ``chunk-<client>-trace.csv``: start, rate, cv, distribution name, p1, p2."""
    windows: list[_Window] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            try:
                start, rate, cv = (float(cell) for cell in row[:3])
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: {exc}") from exc
            dist = row[3].strip() if len(row) > 3 else ""
            windows.append(_Window(start_s=start, rate=rate, cv=cv, dist=dist))
    windows.sort(key=lambda w: w.start_s)
    return windows


def _parse_pmf(text: str, where: str) -> _Pmf | None:
    """A ``"{value: probability}"`` literal as a sampler; None when it has no mass."""
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"{where}: not a dict literal: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"{where}: expected a dict literal, got {type(parsed).__name__}")
    support = sorted((int(v), float(p)) for v, p in parsed.items() if float(p) > 0)
    if not support:
        return None
    return _Pmf(
        values=tuple(v for v, _ in support),
        cum_weights=tuple(itertools.accumulate(p for _, p in support)),
    )


class _ServegenDataset:
    """Token distributions of one client, keyed by window start (seconds)."""

    def __init__(self, path: Path) -> None:
        with path.open(encoding="utf-8") as handle:
            raw = json.load(handle)
        self._path = path
        self._raw: dict[float, dict[str, str]] = {float(k): v for k, v in raw.items()}
        self._starts = sorted(self._raw)
        self._cache: dict[tuple[float, str], _Pmf | None] = {}

    def _pmf_at(self, start: float, field: str) -> _Pmf | None:
        key = (start, field)
        if key not in self._cache:
            text = self._raw[start].get(field, "{}")
            self._cache[key] = _parse_pmf(text, f"{self._path}[{start:g}].{field}")
        return self._cache[key]

    def pmf(self, window_start: float, field: str) -> _Pmf:
        """The distribution for a window: its own entry, else the nearest earlier one with
        mass, else the nearest later one.

        Raises:
            ValueError: the client has no ``field`` data at all.
        """
        cut = bisect.bisect_right(self._starts, window_start)
        earlier = reversed(self._starts[:cut])
        later = self._starts[cut:]
        for start in itertools.chain(earlier, later):
            pmf = self._pmf_at(start, field)
            if pmf is not None:
                return pmf
        raise ValueError(f"{self._path}: no {field} distribution in any window")


def _window_arrivals(window: _Window, rng: random.Random, end_s: float) -> Iterator[float]:
    """Arrival times (seconds, absolute) of a renewal process restarted at the window start.

    Inter-arrival times are Gamma(shape=1/cv^2, scale=1/(rate*shape)), so their mean is
    1/rate and their coefficient of variation is cv; cv <= 0 means evenly spaced.
    """
    if window.cv > 0:
        shape = 1.0 / (window.cv * window.cv)
        scale = 1.0 / (window.rate * shape)
        gaps: Iterable[float] = iter(lambda: rng.gammavariate(shape, scale), None)
    else:
        gaps = itertools.repeat(1.0 / window.rate)
    t = window.start_s
    for gap in gaps:
        t += gap
        if t >= end_s:
            return
        yield t


def load_servegen(
    folder: str | os.PathLike[str],
    *,
    clients: list[str] | None,
    start_s: float,
    duration_s: float,
    seed: int,
) -> list[TraceRequest]:
    """Sample requests from ServeGen per-client workload statistics.

    For each client and each 10-minute window of ``chunk-<client>-trace.csv`` that
    overlaps ``[start_s, start_s + duration_s)``, arrivals are drawn as a renewal process
    started at the window start with Gamma inter-arrival times of shape ``1/cv**2`` and
    scale ``1/(rate*shape)`` (mean ``1/rate`` seconds). Rows with rate 0 have no
    requests. Rows naming another distribution (the published data has ``Weibull``)
    fall back to that same Gamma built from the row's rate and cv; their own ``p1, p2``
    are not used. The published ``p1, p2`` of Gamma rows are not used either: rate and cv
    define the window.

    Each request's prompt and output token counts are drawn from the window's
    ``input_tokens`` / ``output_tokens`` distributions in ``chunk-<client>-dataset.json``
    (parsed with :func:`ast.literal_eval`). The published datasets have entries only every
    6 hours, some empty: a window uses the nearest earlier entry with data (the nearest
    later one if there is none). Token counts are clamped to >= 1.

    Each (seed, client, window) has its own random stream, so the result is deterministic
    for a seed, and a shorter range yields exactly the requests of a longer one that fall
    inside it.

    Args:
        folder: the ``servegen-deepseek-r1`` folder (or one shaped like it).
        clients: client ids (``"35"``, not ``"servegen-35"``); all clients in the folder
            when None.
        start_s: start of the replayed range, seconds since the start of the trace day.
        duration_s: length of the range, seconds (> 0).
        seed: random seed.

    Returns:
        Requests with source ``servegen-<client>``, ``offset_s`` in seconds since
        ``start_s``, sorted by offset then source.

    Raises:
        ConfigurationError: a requested client is not in the folder, or the range is
            invalid.
        ValueError: a malformed trace row or dataset entry.
    """
    if not (math.isfinite(start_s) and start_s >= 0):
        raise ConfigurationError(f"start_s must be finite and >= 0, not {start_s}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigurationError(f"duration_s must be finite and > 0, not {duration_s}")
    root = Path(folder)
    available = servegen_clients(root)
    selected = available if clients is None else list(clients)
    unknown = [c for c in selected if c not in available]
    if unknown:
        raise ConfigurationError(
            f"unknown ServeGen client(s) {unknown} in {root}; "
            f"{len(available)} available (e.g. {available[:5]})"
        )
    end_s = start_s + duration_s
    requests: list[TraceRequest] = []
    for client in selected:
        requests.extend(_sample_client(root, client, start_s, end_s, seed))
    requests.sort(key=lambda r: (r.offset_s, r.source))
    return requests


def _sample_client(
    root: Path, client: str, start_s: float, end_s: float, seed: int
) -> Iterator[TraceRequest]:
    windows = _read_windows(root / f"chunk-{client}-trace.csv")
    dataset: _ServegenDataset | None = None
    source = f"servegen-{client}"
    for window in windows:
        window_end = window.start_s + SERVEGEN_WINDOW_S
        if window.rate <= 0 or window_end <= start_s or window.start_s >= end_s:
            continue
        if dataset is None:
            dataset = _ServegenDataset(root / f"chunk-{client}-dataset.json")
        inputs = dataset.pmf(window.start_s, "input_tokens")
        outputs = dataset.pmf(window.start_s, "output_tokens")
        rng = random.Random(f"servegen:{seed}:{client}:{window.start_s!r}")
        for t in _window_arrivals(window, rng, min(window_end, end_s)):
            prompt, output = inputs.sample(rng), outputs.sample(rng)
            if t < start_s:
                continue
            yield TraceRequest(
                source=source,
                offset_s=t - start_s,
                prompt_tokens=max(1, prompt),
                output_tokens=max(1, output),
            )


# --- by name ----------------------------------------------------------------------------


def load_trace(
    name: str,
    *,
    sources: Sequence[str] | None = None,
    start_s: float = 0.0,
    duration_s: float | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[TraceRequest]:
    """Load a bundled dataset by name, one tenant source per file or client.

    Args:
        name: ``"azure-llm-2023"`` (sources ``azure-code``, ``azure-conv``) or
            ``"servegen-deepseek-r1"`` (sources ``servegen-<client>``).
        sources: tenant sources to keep; all when None.
        start_s: ServeGen only: start of the range, seconds into the trace day. Must be 0
            for Azure.
        duration_s: seconds of trace to keep; the whole trace when None.
        seed: ServeGen only: random seed for the sampled arrivals and token counts.
        data_dir: folder holding the datasets; :func:`default_traces_dir` when None.

    Returns:
        Requests of all selected sources, sorted by ``offset_s``.

    Raises:
        ConfigurationError: unknown dataset or source, or an option the dataset does not
            take.
    """
    available = {t.name: t for t in list_traces(data_dir)}
    if name not in available:
        raise ConfigurationError(f"unknown trace {name!r}; bundled: {sorted(available)}")
    trace = available[name]
    wanted = list(trace.sources) if sources is None else list(sources)
    unknown = [s for s in wanted if s not in trace.sources]
    if unknown:
        raise ConfigurationError(f"trace {name!r} has no source(s) {unknown}")
    if trace.kind == "azure":
        if start_s:
            raise ConfigurationError("start_s is only supported for ServeGen traces")
        requests = [
            r
            for s in wanted
            for r in load_azure(trace.path / AZURE_FILES[s], source=s, duration_s=duration_s)
        ]
        requests.sort(key=lambda r: (r.offset_s, r.source))
        return requests
    if duration_s is None:
        last = max(w.start_s for c in wanted for w in _read_windows(_trace_csv(trace.path, c)))
        duration_s = last + SERVEGEN_WINDOW_S - start_s
    clients = [s.removeprefix("servegen-") for s in wanted]
    return load_servegen(trace.path, clients=clients, start_s=start_s, duration_s=duration_s, seed=seed)


def _trace_csv(folder: Path, source: str) -> Path:
    return folder / f"chunk-{source.removeprefix('servegen-')}-trace.csv"
