"""PostgreSQL deployment set-up: the two roles and the database.

Patinox uses two roles on PostgreSQL:

* the **owner** role owns the schema objects; it runs migrations and creates bridge
  schemas and silo databases (``CREATEDB``). The server uses it only for DDL.
* the **application** role owns nothing and has neither ``SUPERUSER`` nor ``BYPASSRLS``;
  every query of the server runs as this role, so row-level security (forced on every
  tenant table) applies to all data access.

:func:`bootstrap` creates both roles (``LOGIN``; passwords optional) and the database,
connected with an administrator URL (a superuser or a role with ``CREATEROLE`` and
``CREATEDB``); it is idempotent. URLs then look like
``postgresql://patinox_app@127.0.0.1:5432/patinox`` (application) and
``postgresql://patinox_owner@127.0.0.1:5432/patinox`` (owner).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import create_engine, text

from patinox.errors import ConfigurationError
from patinox.storage.engine import normalise_url, translate_errors, with_database

#: Matched whole (``fullmatch``; ``$`` would also match before a final newline).
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def check_identifier(name: str, what: str) -> str:
    """``name`` if it is a safe lower-case SQL identifier, else :class:`ConfigurationError`."""
    if _IDENT.fullmatch(name) is None:
        raise ConfigurationError(
            f"{what} {name!r} must be 1-63 lower-case letters, digits and '_', not starting with a digit",
            field=what,
        )
    return name


@dataclass(frozen=True, kw_only=True)
class PostgresDeployment:
    """The URLs a bootstrapped database is used through."""

    app_url: str
    owner_url: str
    app_role: str
    owner_role: str
    database: str


def bootstrap(
    admin_url: str,
    *,
    database: str,
    owner_role: str = "patinox_owner",
    app_role: str = "patinox_app",
    password: str | None = None,
) -> PostgresDeployment:
    """Create (if missing) the owner and application roles and the database.

    Raises:
        ConfigurationError: a name is not a safe identifier.
        StorageError: PostgreSQL refused (e.g. the admin role lacks CREATEROLE).
    """
    for name, what in ((database, "database"), (owner_role, "owner_role"), (app_role, "app_role")):
        check_identifier(name, what)
    pw = "" if password is None else " PASSWORD " + _literal(password)
    engine = create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with translate_errors(), engine.connect() as conn:
            roles = {r[0] for r in conn.execute(text("SELECT rolname FROM pg_roles"))}
            if owner_role not in roles:
                conn.exec_driver_sql(f'CREATE ROLE "{owner_role}" LOGIN CREATEDB{pw}')
            if app_role not in roles:
                conn.exec_driver_sql(
                    f'CREATE ROLE "{app_role}" LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE{pw}'
                )
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}
            ).scalar()
            if not exists:
                conn.exec_driver_sql(f'CREATE DATABASE "{database}" OWNER "{owner_role}"')
            conn.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{database}" TO "{app_role}"')
    finally:
        engine.dispose()
    base = with_database(admin_url, database)
    return PostgresDeployment(
        app_url=_with_user(base, app_role, password),
        owner_url=_with_user(base, owner_role, password),
        app_role=app_role,
        owner_role=owner_role,
        database=database,
    )


def drop(admin_url: str, *, database: str) -> None:
    """Drop ``database`` and every silo database made from it (``<database>_tn_...``)."""
    check_identifier(database, "database")
    engine = create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with translate_errors(), engine.connect() as conn:
            names = [
                r[0]
                for r in conn.execute(
                    text("SELECT datname FROM pg_database WHERE datname = :d OR datname LIKE :p"),
                    {"d": database, "p": database + "\\_tn\\_%"},
                )
            ]
            for name in names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _with_user(url: str, user: str, password: str | None) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(username=user, password=password).render_as_string(hide_password=False)
