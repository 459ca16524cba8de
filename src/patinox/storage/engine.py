"""Engines from database URLs, driver-error translation, and schema migration.

URL formats:
    ``sqlite:///PATH.db`` — the embedded default (one file; silo tenants get
    ``<dir>/tenants/<tenant_id>.db`` beside it).
    ``sqlite://`` — in memory, for tests only (single connection).
    ``postgresql://ROLE@HOST:PORT/DB`` (or ``postgresql+psycopg://...``) — PostgreSQL through
    psycopg 3. Patinox connects as two roles: the *application* role (owns nothing, no
    ``BYPASSRLS``) for all data access, and the *owner* role for migrations and for
    creating bridge schemas and silo databases. See :mod:`patinox.storage.postgres`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import unquote

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from patinox.errors import (
    AlreadyExists,
    ConfigurationError,
    InvalidRequest,
    MissingDependency,
    PatinoxError,
    StorageError,
)
from patinox.storage import _checkpoint, _fast
from patinox.storage._cache import sqlite_target

_MIGRATIONS = Path(__file__).parent / "migrations"
#: PostgreSQL advisory-lock key that serialises migrations of one database (any constant
#: unlikely to collide with an application's own advisory locks: "patinox\0" as int64).
_MIGRATION_LOCK_KEY = int.from_bytes(b"patinox\0", "big") & 0x7FFF_FFFF_FFFF_FFFF
#: How long an SQLite writer waits for another process's write lock, milliseconds.
_BUSY_TIMEOUT_MS = 5_000
#: How long a process waits for another's SQLite migration, milliseconds.
_MIGRATION_WAIT_MS = 600_000


def normalise_url(url: str) -> str:
    """``url`` in the form SQLAlchemy and psycopg 3 read as libpq would.

    ``postgresql://`` and ``postgres://`` mean psycopg 3 (``postgresql+psycopg://``). A
    Unix-socket directory given percent-encoded as the host, libpq's
    ``postgresql://ROLE@%2Frun%2Fpostgresql/DB``, moves to the query
    (``postgresql+psycopg://ROLE@/DB?host=/run/postgresql``): SQLAlchemy would hand the
    encoded text to the driver as a host name. Other URLs are returned as given.

    Raises:
        ConfigurationError: the URL names a socket directory as its host and another host
            in its query.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
            break
    if url.startswith("postgresql+") and "%2f" in url.lower():
        return _socket_host_in_query(url)
    return url


def _socket_host_in_query(url: str) -> str:
    """``url`` with a percent-encoded socket directory host moved to ``?host=``."""
    parsed = make_url(url)
    host = unquote(parsed.host or "")
    if not host.startswith("/"):
        return url
    if "host" in parsed.query:
        raise ConfigurationError(
            f"a PostgreSQL URL names two hosts: the socket directory {host!r} and "
            f"?host={parsed.query['host']!r}; give one",
            field="database_url",
        )
    moved = URL.create(
        parsed.drivername,
        username=parsed.username,
        password=parsed.password,
        port=parsed.port,
        database=parsed.database,
        query={**parsed.query, "host": host},
    )
    return moved.render_as_string(hide_password=False)


def is_postgres(url: str) -> bool:
    """True for PostgreSQL URLs."""
    return url.startswith(("postgresql", "postgres:"))


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An engine for ``url`` with the settings Patinox relies on.

    SQLite: WAL journal (readers never block the writer), ``synchronous=NORMAL`` (durable
    at checkpoint; a power loss may lose the last transactions, never corrupt), foreign
    keys on, 5 s busy timeout for writers in other processes, ``secure_delete`` on; for a
    file, WAL checkpoints on a background thread instead of in commits
    (:mod:`patinox.storage._checkpoint`) and one connection kept open between the owner
    thread's transactions (:func:`begin`, :mod:`patinox.storage._fast`; not with
    ``PATINOX_SQLA_FASTPATH=0``).
    PostgreSQL: psycopg 3, pre-ping, a pool of ``pool_size`` connections.

    Raises:
        ConfigurationError: the URL's scheme is not supported.
        MissingDependency: psycopg is not installed for a PostgreSQL URL.
    """
    if url.startswith("sqlite"):
        kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, **kwargs)
        # The file the database lives in (a URI filename's path too); None in memory.
        target = None if "poolclass" in kwargs else sqlite_target(url)
        database = target[1] if target is not None and not target[0] else None

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            # Deleted content is overwritten, so a deleted tenant's rows do not linger
            # in free pages of the file.
            cur.execute("PRAGMA secure_delete=ON")
            if database:
                # Checkpoints run on a background thread, not in the commit that crosses
                # SQLite's 1,000-page threshold (see patinox.storage._checkpoint).
                cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.close()

        if database:
            _checkpoint.register(engine, Path(database).resolve())
            _fast.keep_for(engine)
        return engine
    if is_postgres(url):
        try:
            import psycopg  # noqa: F401
        except ImportError as err:
            raise MissingDependency(
                "PostgreSQL needs psycopg: pip install 'patinox[postgres]'", extra="postgres"
            ) from err
        return create_engine(
            normalise_url(url), pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
        )
    raise ConfigurationError(
        f"unsupported database URL scheme {url.split(':', 1)[0]!r}; "
        "use sqlite:///PATH or postgresql://ROLE@HOST/DB",
        field="database_url",
    )


#: ``engine.begin()``, on the connection the owner thread keeps (see :mod:`patinox.storage._fast`).
begin = _fast.begin
#: ``engine.dispose()``, closing the kept connection first (see :mod:`patinox.storage._fast`).
dispose = _fast.dispose


def database_name(url: str) -> str | None:
    """The database name in ``url``."""
    return make_url(normalise_url(url)).database


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    return make_url(normalise_url(url)).set(database=database).render_as_string(hide_password=False)


_T = TypeVar("_T")


class translate_errors(Generic[_T]):
    """Map driver errors to Patinox errors, chaining the original; a context manager.

    Integrity (unique/foreign key) violations become :class:`AlreadyExists`, values out of
    the storable range :class:`InvalidRequest`; every other driver error becomes
    :class:`StorageError`. Patinox errors and anything else pass through unchanged.

    ``with translate_errors(value) as v`` hands ``value`` back (a connection a caller
    joins). A class, not a generator: a run enters about a dozen of these.
    """

    __slots__ = ("_value",)

    def __init__(self, value: _T = None) -> None:  # type: ignore[assignment]
        self._value = value

    def __enter__(self) -> _T:
        return self._value

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: object
    ) -> Literal[False]:
        if err is None or isinstance(err, PatinoxError):
            return False
        mapped = _translated(err)
        if mapped is None:
            return False
        raise mapped from err


def _translated(err: BaseException) -> PatinoxError | None:
    """The Patinox error for a driver error (see :class:`translate_errors`), or None."""
    if isinstance(err, exc.IntegrityError):
        return AlreadyExists("a record with that key already exists")
    if isinstance(err, OverflowError):
        return InvalidRequest("a value is out of the range the database can store")
    if isinstance(err, exc.DataError):
        # The database refused a value (e.g. a NUL character in PostgreSQL text).
        return InvalidRequest("a value cannot be stored (invalid characters or format)")
    if isinstance(err, exc.StatementError):
        if isinstance(err.orig, OverflowError | ValueError) and not isinstance(err, exc.DBAPIError):
            # Raised while binding a parameter, before the database saw anything.
            return InvalidRequest("a value is out of the range the database can store")
        return StorageError(f"database error: {type(err.orig or err).__name__}")
    if isinstance(err, exc.SQLAlchemyError):
        return StorageError(f"database error: {type(getattr(err, 'orig', None) or err).__name__}")
    return None


def migrate(engine: Engine, *, schema: str | None = None, app_role: str | None = None) -> None:
    """Bring a database (or one bridge schema) to the newest Alembic revision; idempotent.

    Args:
        engine: connected as the owner role (PostgreSQL) or the SQLite file.
        schema: a bridge schema to migrate (its tables and version table live there).
        app_role: PostgreSQL application role to grant data access to afterwards.
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Every server and worker migrates on start. Concurrent GRANTs on the same
            # objects fail with "tuple concurrently updated" and concurrent upgrades race
            # on alembic_version, so one process migrates a database at a time; the lock
            # is released at commit.
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
        elif conn.dialect.name == "sqlite":
            # The same on SQLite (a server and its local workers start together): take the
            # write lock before reading the version, waiting for another process's
            # migration, and keep its DDL in this transaction (the driver would otherwise
            # run CREATE TABLE outside it, and two table rebuilds collide).
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {_MIGRATION_WAIT_MS}")
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            finally:
                conn.exec_driver_sql(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if schema is not None:
            conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
        cfg.attributes["connection"] = conn
        cfg.attributes["schema"] = schema
        command.upgrade(cfg, "head")
        if app_role is not None and conn.dialect.name == "postgresql":
            grant_app_role(conn, app_role, schema or "public")


def head_revision() -> str:
    """The newest Alembic revision of Patinox's migrations."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine, *, schema: str | None = None) -> str | None:
    """The Alembic revision a database (or bridge schema) is at; ``None`` before the first."""
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        if schema is not None:
            conn.exec_driver_sql(f'SET search_path TO "{schema}"')
        try:
            return MigrationContext.configure(
                conn, opts={"version_table_schema": schema}
            ).get_current_revision()
        finally:
            if schema is not None:
                conn.exec_driver_sql("RESET search_path")
            conn.rollback()


def grant_app_role(conn: Connection, app_role: str, schema: str) -> None:
    """Give the application role data access (no DDL, no ownership) in ``schema``."""
    conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{app_role}"')
    conn.exec_driver_sql(
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{app_role}"'
    )
    conn.exec_driver_sql(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA "{schema}" TO "{app_role}"')
