"""Engines from database URLs, driver-error translation, and schema migration.

URL formats:
    ``sqlite:///ABSOLUTE/OR/RELATIVE/path.db`` — the embedded default (one file).
    ``sqlite://`` — in memory, for tests only (single connection).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.pool import StaticPool

from patinox.errors import AlreadyExists, ConfigurationError, PatinoxError, StorageError

_MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the pragmas Patinox relies on.

    SQLite: WAL journal (readers never block the writer), ``synchronous=NORMAL`` (durable
    at checkpoint; a power loss may lose the last transactions, never corrupt), foreign
    keys on, 5 s busy timeout for writers in other processes, ``secure_delete`` on.

    Raises:
        ConfigurationError: the URL's scheme is not supported by this build.
    """
    if url.startswith("sqlite"):
        kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=5000")
            # Deleted content is overwritten, so a deleted tenant's rows do not linger
            # in free pages of the file.
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

        return engine
    raise ConfigurationError(
        f"unsupported database URL scheme in {url.split(':', 1)[0]!r}; use sqlite:///PATH",
        field="database_url",
    )


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map driver errors to Patinox errors, chaining the original.

    Integrity (unique/foreign key) violations become :class:`AlreadyExists`; every other
    driver error becomes :class:`StorageError`.

    Patinox errors raised inside pass through unchanged.
    """
    try:
        yield
    except PatinoxError:
        raise
    except exc.IntegrityError as err:
        raise AlreadyExists("a record with that key already exists") from err
    except exc.SQLAlchemyError as err:
        raise StorageError(
            f"database error: {type(err.orig if hasattr(err, 'orig') else err).__name__}"
        ) from err


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
