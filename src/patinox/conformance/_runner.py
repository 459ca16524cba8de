"""Run every check on every storage deployment and report one line per check."""

from __future__ import annotations

import multiprocessing
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from patinox.conformance._checks import _context, _deletion, _encryption, _postgres, _tenant_routes
from patinox.conformance._deployment import (
    ConformanceFailure,
    Markers,
    SuiteEnv,
    Target,
    open_target,
    scratch_postgres,
    select_deployments,
)
from patinox.errors import ConfigurationError, MissingDependency
from patinox.storage.engine import is_postgres
from patinox.storage.postgres import PostgresDeployment

#: Steps of one state-machine example (hypothesis ``stateful_step_count``).
STATEFUL_STEPS = 25


@dataclass(frozen=True, kw_only=True)
class CheckOutcome:
    """The result of one check on one deployment.

    Attributes:
        deployment: ``sqlite-pool``, ``sqlite-silo``, ``pg-pool``, ``pg-bridge`` or ``pg-silo``.
        check: the check's name (see :data:`CHECKS`).
        passed: True when the check found nothing wrong.
        reason: one line saying what failed (empty when passed).
        detail: the full story of a failure: traceback, and for the state machine the
            steps hypothesis ran (empty when passed).
        seconds: wall time of the check, seconds.
    """

    deployment: str
    check: str
    passed: bool
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        """``PASS <deployment> <check>`` or ``FAIL <deployment> <check>: <reason>``."""
        if self.passed:
            return f"PASS {self.deployment} {self.check}"
        return f"FAIL {self.deployment} {self.check}: {self.reason}"


@dataclass(kw_only=True)
class ConformanceResult:
    """What :func:`run_conformance` found.

    Attributes:
        passed / failed: checks that passed / failed (the closing line's N and M).
        outcomes: every check's outcome, in the order run.
        deployments: the deployments checked.
        postgres: True when PostgreSQL deployments were checked.
        seconds: wall time of the whole run, seconds.
    """

    passed: int = 0
    failed: int = 0
    outcomes: list[CheckOutcome] = field(default_factory=list)
    deployments: list[str] = field(default_factory=list)
    postgres: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when at least one check ran and none failed."""
        return self.failed == 0 and self.passed > 0

    @property
    def failures(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.passed]

    def summary(self) -> str:
        """The closing line: ``N passed, M failed``."""
        return f"{self.passed} passed, {self.failed} failed"


@dataclass(frozen=True)
class Check:
    """One conformance check: ``run(target, env)`` returns, or raises on a violation."""

    name: str
    run: Callable[[Target, SuiteEnv], None]
    postgres_only: bool = False
    storage_models: frozenset[str] = frozenset({"pool", "bridge", "silo"})

    def applies(self, target_name: str) -> bool:
        kind, model = target_name.split("-", 1)
        return (kind == "pg" or not self.postgres_only) and model in self.storage_models


def _stateful(t: Target, env: SuiteEnv) -> None:
    from patinox.conformance._stateful import run_stateful

    run_stateful(t, examples=env.examples, steps=STATEFUL_STEPS, report=env.report)


#: Every check, in the order each deployment runs them.
CHECKS: tuple[Check, ...] = (
    Check("no-plaintext-at-rest", _encryption.no_plaintext_at_rest),
    Check("ciphertext-bound-to-row", _encryption.ciphertext_bound_to_row),
    Check("foreign-ids-like-missing", _tenant_routes.foreign_ids_like_missing),
    Check("delete-shreds-and-purges", _deletion.delete_shreds_and_purges),
    Check("delete-with-runs-in-flight", _deletion.delete_with_runs_in_flight),
    Check("same-cache-key-material", _tenant_routes.same_cache_key_material),
    Check("idempotency-keys-per-tenant", _tenant_routes.idempotency_keys_per_tenant),
    Check("webhooks-per-tenant", _tenant_routes.webhooks_per_tenant),
    Check("first-dek-race", _encryption.first_dek_race),
    Check("thread-pool-context", _context.thread_pool_context),
    Check("worker-process-context", _context.worker_process_context),
    Check("pool-of-one-connection", _postgres.pool_of_one_connection, True, frozenset({"pool", "bridge"})),
    Check("rls-as-app-role", _postgres.rls_as_app_role, postgres_only=True),
    Check("stateful-isolation", _stateful),
)


class _Env:
    """What checks share within one run: settings, the worker process pool (lazy)."""

    def __init__(self, stack: ExitStack, examples: int) -> None:
        self._stack = stack
        self.examples = examples
        self.report_lines: list[str] = []
        self._pool: ProcessPoolExecutor | None = None

    def report(self, line: object) -> None:
        self.report_lines.append(str(line))

    def process_pool(self) -> ProcessPoolExecutor:
        """One spawned worker process, reused by every deployment (started on first use)."""
        if self._pool is None:
            pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            self._stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            self._pool = pool
        return self._pool


def _root_failure(err: BaseException) -> tuple[BaseException, str]:
    """The violation inside ``err``: hypothesis wraps a failure that did not happen again
    on its final replay in an exception group (``FlakyFailure``)."""
    if isinstance(err, BaseExceptionGroup):
        leaves = list(_leaves(err))
        found = next((e for e in leaves if isinstance(e, ConformanceFailure)), leaves[0] if leaves else err)
        return found, " (seen once; it did not happen again when hypothesis replayed the steps)"
    return err, ""


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def _one_line(err: BaseException) -> str:
    err, suffix = _root_failure(err)
    text = str(err) if isinstance(err, ConformanceFailure) else f"{type(err).__name__}: {err}"
    cause = err.__cause__
    if cause is not None and not isinstance(err, ConformanceFailure):
        first = (str(cause).strip().splitlines() or [""])[0]
        text += f" (caused by {type(cause).__name__}: {first})"
    text += suffix
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:597] + "..."


def _detail(err: BaseException, report: list[str]) -> str:
    seen = "\n".join(report)
    notes = [str(n) for n in getattr(err, "__notes__", []) if str(n) not in seen]
    tb = "".join(traceback.format_exception(err))
    return "\n".join([*report, *notes, tb])


def run_conformance(
    *,
    admin_url: str | None,
    models: list[str] | None = None,
    sqlite_dir: Path | None = None,
    examples: int = 30,
    out: Callable[[str], None] = print,
) -> ConformanceResult:
    """Run the isolation conformance suite; see :mod:`patinox.conformance`.

    Args:
        admin_url: a PostgreSQL URL of a role that may create databases and roles and
            bypasses row-level security (a superuser), e.g.
            ``postgresql://postgres@127.0.0.1:5432/postgres``. The suite creates a scratch
            database with its own owner and application roles, runs the PostgreSQL storage
            models there as the application role, and drops database and roles at the end,
            also on failure. ``None``: SQLite deployments only.
        models: deployments to check (``sqlite-pool``, ``sqlite-silo``, ``pg-pool``,
            ``pg-bridge``, ``pg-silo``) or storage models (``pool``, ``bridge``, ``silo``);
            default: every one available.
        sqlite_dir: where the SQLite deployments are made (a temporary directory inside it,
            removed at the end); default: the system temporary directory.
        examples: hypothesis examples of the state machine per deployment (each up to
            :data:`STATEFUL_STEPS` steps).
        out: receives each output line (``PASS ...``/``FAIL ...``, and the closing
            ``N passed, M failed``).

    Returns:
        The counts and every check's outcome (failure details included).

    Raises:
        ConfigurationError: ``admin_url`` is not a PostgreSQL URL (SQLite is always
            checked, in a temporary directory), an unknown model, a PostgreSQL model
            without ``admin_url``, or ``examples`` < 1.
        MissingDependency: hypothesis (``patinox[conformance]``) or psycopg
            (``patinox[postgres]``) is not installed.
    """
    started = time.perf_counter()
    names = _deployments_to_check(admin_url, models, examples)
    result = ConformanceResult(deployments=names, postgres=any(n.startswith("pg-") for n in names))
    markers = Markers()
    if admin_url is None:
        out("note: no PostgreSQL admin URL given: PostgreSQL storage models (pool, bridge, silo) NOT checked")
    with ExitStack() as stack:
        base = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(
                    prefix="patinox-conformance-", dir=sqlite_dir, ignore_cleanup_errors=True
                )
            )
        )
        env = _Env(stack, examples)
        pg, pg_error = _open_postgres(stack, admin_url, result, out)
        for name in names:
            _run_deployment(name, pg, pg_error, admin_url, base, markers, env, result, out)
    result.seconds = time.perf_counter() - started
    out(result.summary())
    return result


def _deployments_to_check(admin_url: str | None, models: list[str] | None, examples: int) -> list[str]:
    """The deployments :func:`run_conformance` is asked to check, once its arguments and
    the libraries those deployments need are found good.

    Raises:
        ConfigurationError: see :func:`run_conformance`.
        MissingDependency: see :func:`run_conformance`.
    """
    if admin_url is not None and not is_postgres(admin_url):
        # Only the scheme is named: the rest of a URL may hold a password.
        scheme, sep, _ = admin_url.partition("://")
        got = f"a {scheme!r} URL" if sep else "text that is not a URL"
        raise ConfigurationError(
            "the conformance suite takes a PostgreSQL URL (postgresql://ROLE@HOST:PORT/DB) of a "
            f"role that may create databases and roles, got {got}; SQLite pool and silo are "
            "always checked, in a temporary directory: omit the URL to check SQLite only",
            field="admin_url",
        )
    if examples < 1:
        raise ConfigurationError("examples must be at least 1", field="examples")
    try:
        import hypothesis  # noqa: F401
    except ImportError as err:
        raise MissingDependency(
            "the conformance suite needs hypothesis: pip install 'patinox[conformance]'", extra="conformance"
        ) from err
    names = select_deployments(models, postgres=admin_url is not None)
    if any(n.startswith("pg-") for n in names):
        try:
            import psycopg  # noqa: F401
        except ImportError as err:
            raise MissingDependency(
                "PostgreSQL needs psycopg: pip install 'patinox[postgres]'", extra="postgres"
            ) from err
    return names


def _open_postgres(
    stack: ExitStack, admin_url: str | None, result: ConformanceResult, out: Callable[[str], None]
) -> tuple[PostgresDeployment | None, BaseException | None]:
    """The scratch PostgreSQL deployment (dropped when ``stack`` closes; a failure to drop
    it is recorded as a ``cleanup`` outcome), or the error that kept it from being made;
    ``(None, None)`` when no PostgreSQL deployment is to be checked."""
    pg: PostgresDeployment | None = None
    pg_error: BaseException | None = None
    if result.postgres:
        assert admin_url is not None

        def cleanup_failed(what: str, err: BaseException) -> None:
            _record(
                result,
                out,
                CheckOutcome(
                    deployment="postgres",
                    check="cleanup",
                    passed=False,
                    reason=f"{what}: {_one_line(err)}",
                    detail=_detail(err, []),
                ),
            )

        try:
            pg = stack.enter_context(scratch_postgres(admin_url, on_cleanup_error=cleanup_failed))
        except Exception as err:
            pg_error = err
    return pg, pg_error


def _run_deployment(
    name: str,
    pg: PostgresDeployment | None,
    pg_error: BaseException | None,
    admin_url: str | None,
    base: Path,
    markers: Markers,
    env: _Env,
    result: ConformanceResult,
    out: Callable[[str], None],
) -> None:
    checks = [c for c in CHECKS if c.applies(name)]

    def record(outcome: CheckOutcome) -> None:
        _record(result, out, outcome)

    def setup_failed(err: BaseException) -> None:
        for c in checks:
            record(
                CheckOutcome(
                    deployment=name,
                    check=c.name,
                    passed=False,
                    reason="deployment set-up failed: " + _one_line(err),
                    detail=_detail(err, []),
                )
            )

    if name.startswith("pg-") and pg_error is not None:
        setup_failed(pg_error)
        return
    try:
        with open_target(name, pg=pg, admin_url=admin_url, base_dir=base, markers=markers) as target:
            for c in checks:
                record(_run_check(c, target, env))
    except Exception as err:  # set-up or tear-down of the deployment itself
        done = {o.check for o in result.outcomes if o.deployment == name}
        checks = [c for c in checks if c.name not in done]
        if checks:
            setup_failed(err)
        else:
            record(
                CheckOutcome(
                    deployment=name,
                    check="teardown",
                    passed=False,
                    reason=_one_line(err),
                    detail=_detail(err, []),
                )
            )


def _record(result: ConformanceResult, out: Callable[[str], None], outcome: CheckOutcome) -> None:
    result.outcomes.append(outcome)
    if outcome.passed:
        result.passed += 1
    else:
        result.failed += 1
    out(outcome.line())


def _run_check(c: Check, target: Target, env: _Env) -> CheckOutcome:
    env.report_lines.clear()
    t0 = time.perf_counter()
    try:
        c.run(target, env)
    except Exception as err:
        return CheckOutcome(
            deployment=target.name,
            check=c.name,
            passed=False,
            reason=_one_line(err),
            detail=_detail(err, list(env.report_lines)),
            seconds=time.perf_counter() - t0,
        )
    return CheckOutcome(deployment=target.name, check=c.name, passed=True, seconds=time.perf_counter() - t0)
