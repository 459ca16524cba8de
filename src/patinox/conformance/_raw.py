"""Raw storage access, below Patinox: what an attacker with the database files or a
database superuser sees.

SQLite: the files themselves (main file, WAL, silo files), read as bytes or with
:mod:`sqlite3`. PostgreSQL: the administrator URL the suite was given (a superuser, or a
role with ``BYPASSRLS``), so row-level security hides nothing from these reads; every
table in every schema of the main database and of every silo database.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, text

from patinox.conformance._deployment import Target, check
from patinox.storage.engine import normalise_url, with_database

_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")


@dataclass(frozen=True)
class Location:
    """Where one tenant's rows are: a SQLite file, or a PostgreSQL database and schema."""

    sqlite_file: Path | None
    pg_database: str | None
    schema: str | None

    def table(self, name: str) -> str:
        """The quoted, schema-qualified table name."""
        return f'"{self.schema}"."{name}"' if self.schema else f'"{name}"'


def silo_file(t: Target, tenant_id: str) -> Path:
    """The SQLite silo file of a tenant (it exists only for silo tenants)."""
    return t.sqlite_path.parent / "tenants" / f"{tenant_id}.db"


def silo_database(t: Target, tenant_id: str) -> str:
    """The PostgreSQL silo database name of a tenant."""
    assert t.pg is not None
    return f"{t.pg.database}_{tenant_id}"


def location(t: Target, tenant_id: str) -> Location:
    """Where ``tenant_id``'s tenant-owned rows live in deployment ``t``."""
    if not t.postgres:
        path = silo_file(t, tenant_id) if t.storage_model == "silo" else t.sqlite_path
        return Location(path, None, None)
    assert t.pg is not None
    if t.storage_model == "silo":
        return Location(None, silo_database(t, tenant_id), "public")
    if t.storage_model == "bridge":
        return Location(None, t.pg.database, tenant_id)
    return Location(None, t.pg.database, "public")


def control_location(t: Target) -> Location:
    """The shared (control-plane) database: tenants, keys, wrapped DEKs."""
    if not t.postgres:
        return Location(t.sqlite_path, None, None)
    assert t.pg is not None
    return Location(None, t.pg.database, "public")


@contextmanager
def admin(t: Target, database: str) -> Iterator[Connection]:
    """A transaction (committed on success) on ``database`` as the PostgreSQL administrator."""
    assert t.admin_url is not None
    engine = create_engine(normalise_url(with_database(t.admin_url, database)))
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def require_rls_bypass(t: Target) -> None:
    """Fail unless the administrator role bypasses row-level security (else raw reads would
    see nothing and every "nothing found" check would pass vacuously)."""
    assert t.pg is not None
    with admin(t, t.pg.database) as conn:
        ok = conn.execute(
            text("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
        ).scalar()
    check(ok, "the admin role is neither SUPERUSER nor BYPASSRLS: raw storage reads would be filtered")


def pg_databases(t: Target) -> list[str]:
    """The main database and every silo database of the scratch deployment that exists now."""
    assert t.pg is not None
    with admin(t, t.pg.database) as conn:
        silos = [
            str(r[0])
            for r in conn.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE :p ORDER BY datname"),
                {"p": t.pg.database + "\\_tn\\_%"},
            )
        ]
    return [t.pg.database, *silos]


def _pg_tables(conn: Connection) -> list[tuple[str, str]]:
    return [
        (str(s), str(n))
        for s, n in conn.execute(
            text("SELECT schemaname, tablename FROM pg_tables WHERE schemaname <> ALL(:sys)"),
            {"sys": list(_SYSTEM_SCHEMAS)},
        )
    ]


def _sqlite(path: Path) -> sqlite3.Connection:
    """An existing SQLite file, read-write; never creates one (a check must not make a
    deleted silo file reappear)."""
    return sqlite3.connect(path.resolve().as_uri() + "?mode=rw", uri=True, timeout=10)


def sqlite_files(t: Target) -> list[Path]:
    """Every file of a SQLite deployment: the main file, its WAL, every silo file and WAL."""
    main = t.sqlite_path
    files = [main, main.with_name(main.name + "-wal")]
    tenants = main.parent / "tenants"
    if tenants.is_dir():
        files += sorted(p for p in tenants.iterdir() if p.name.endswith((".db", ".db-wal")))
    return [p for p in files if p.exists()]


#: Run in a child process: print the bytes of every file named on the command line.
_CAT = (
    "import pathlib, sys\n"
    "for p in map(pathlib.Path, sys.argv[1:]):\n"
    "    sys.stdout.buffer.write(p.read_bytes() if p.exists() else b'')\n"
)


def _read_elsewhere(paths: list[Path]) -> bytes:
    """The bytes of ``paths``, read by a child process.

    Never open and close a live SQLite file here with plain file I/O: closing any
    descriptor of a file drops every POSIX lock this process holds on it, including the
    locks of the server's open SQLite connections; another process then believes it is
    the file's last user and deletes the WAL and shared-memory files under them ("disk
    I/O error"). See https://www.sqlite.org/howtocorrupt.html, section 2.2.
    """
    if not paths:
        return b""
    done = subprocess.run(
        [sys.executable, "-c", _CAT, *map(str, paths)], capture_output=True, check=True, timeout=120
    )
    return done.stdout


def stored_bytes(t: Target) -> bytes:
    """Everything the storage holds: SQLite files byte for byte; on PostgreSQL every row
    of every table in every schema of the main and every silo database, as text."""
    if not t.postgres:
        return _read_elsewhere(sqlite_files(t))
    require_rls_bypass(t)
    out: list[bytes] = []
    for db in pg_databases(t):
        with admin(t, db) as conn:
            for schema, table in _pg_tables(conn):
                for (row,) in conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t')):
                    out.append(str(row).encode())
    return b"\n".join(out)


def count_tenant_rows(t: Target, tenant_id: str) -> dict[str, int]:
    """Rows of ``tenant_id`` in every table with a ``tenant_id`` column, in every schema of
    every database or file of the deployment; plus ``<schema>``, ``<database>``, ``<file>``
    = 1 while the tenant's own schema, database or file still exists."""
    out: dict[str, int] = {}
    if not t.postgres:
        silo = silo_file(t, tenant_id)
        for suffix in ("", "-wal", "-shm"):
            if silo.with_name(silo.name + suffix).exists():
                out["<file>" + suffix] = 1
        for path in sqlite_files(t):
            if path.name.endswith("-wal"):
                continue
            with closing(_sqlite(path)) as con:
                for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                    cols = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]
                    if "tenant_id" in cols:
                        n = con.execute(f'SELECT count(*) FROM "{table}" WHERE tenant_id = ?', (tenant_id,))
                        out[f"{path.name}:{table}"] = int(n.fetchone()[0])
        return out
    require_rls_bypass(t)
    for db in pg_databases(t):
        if db.endswith("_" + tenant_id):
            out["<database>"] = 1
        with admin(t, db) as conn:
            found = conn.execute(
                text(
                    "SELECT c.table_schema, c.table_name FROM information_schema.columns c "
                    "JOIN information_schema.tables t ON t.table_schema = c.table_schema "
                    "AND t.table_name = c.table_name AND t.table_type = 'BASE TABLE' "
                    "WHERE c.column_name = 'tenant_id' AND c.table_schema <> ALL(:sys)"
                ),
                {"sys": list(_SYSTEM_SCHEMAS)},
            ).all()
            for schema, table in found:
                n = conn.execute(
                    text(f'SELECT count(*) FROM "{schema}"."{table}" WHERE tenant_id = :t'), {"t": tenant_id}
                ).scalar_one()
                out[f"{db}:{schema}.{table}"] = int(n)
            if conn.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": tenant_id}).scalar():
                out[f"<schema> {db}"] = 1
    return out


def dek_rows(t: Target, tenant_id: str) -> int:
    """Wrapped DEK rows of ``tenant_id`` in ``tenant_keys`` (always the shared database)."""
    sql = "SELECT count(*) FROM tenant_keys WHERE tenant_id = :t"
    return int(read_scalar(t, control_location(t), sql, {"t": tenant_id}) or 0)


def read_scalar(t: Target, loc: Location, sql: str, params: dict[str, Any]) -> Any:
    """One value of a raw query at ``loc`` (SQLite: ``:name`` parameters work too)."""
    if loc.sqlite_file is not None:
        with closing(_sqlite(loc.sqlite_file)) as con:
            row = con.execute(sql, params).fetchone()
            return None if row is None else row[0]
    assert loc.pg_database is not None
    with admin(t, loc.pg_database) as conn:
        return conn.execute(text(sql), params).scalar()


def execute(t: Target, loc: Location, sql: str, params: dict[str, Any]) -> int:
    """Run a raw write at ``loc`` and commit it; returns the rows it changed."""
    if loc.sqlite_file is not None:
        with closing(_sqlite(loc.sqlite_file)) as con:
            cur = con.execute(sql, params)
            con.commit()
            return int(cur.rowcount)
    assert loc.pg_database is not None
    with admin(t, loc.pg_database) as conn:
        return int(conn.execute(text(sql), params).rowcount)


def read_cell(t: Target, tenant_id: str, table: str, column: str, key_col: str, key: str) -> bytes | None:
    """The raw stored value of ``table.column`` in the tenant's row ``key_col = key``, as
    bytes (binary columns as stored, text as UTF-8)."""
    loc = location(t, tenant_id)
    value = read_scalar(
        t,
        loc,
        f'SELECT "{column}" FROM {loc.table(table)} WHERE tenant_id = :t AND "{key_col}" = :k',
        {"t": tenant_id, "k": key},
    )
    if value is None:
        return None
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else str(value).encode()


def scan_form(t: Target, value: bytes) -> bytes:
    """How a stored binary value appears in :func:`stored_bytes`: as is in SQLite files,
    in PostgreSQL's hex text form (``\\x...``) in the rows read as text."""
    return b"\\x" + value.hex().encode() if t.postgres else value


def write_cell(
    t: Target, tenant_id: str, table: str, column: str, key_col: str, key: str, value: bytes
) -> None:
    """Overwrite the raw stored value of ``table.column`` in the tenant's row ``key_col = key``
    (as an attacker with write access to the database would)."""
    loc = location(t, tenant_id)
    n = execute(
        t,
        loc,
        f'UPDATE {loc.table(table)} SET "{column}" = :v WHERE tenant_id = :t AND "{key_col}" = :k',
        {"v": value, "t": tenant_id, "k": key},
    )
    check(n == 1, f"raw write of {table}.{column} for {key!r} changed {n} rows, expected 1")
