"""Alembic environment: runs on the connection handed in by :func:`patinox.storage.engine.migrate`,
or on ``-x url=...`` / ``sqlalchemy.url`` when run from the ``alembic`` command line.

For a bridge schema, ``migrate`` sets ``search_path`` to the schema and passes it as
``schema``; the version table then lives in that schema too.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine

from patinox.storage._schema import metadata

config = context.config


def _run(connection: Any, schema: str | None) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,
        compare_type=True,
        version_table_schema=schema,
    )
    with context.begin_transaction():
        context.run_migrations()


conn = config.attributes.get("connection")
if conn is not None:
    _run(conn, config.attributes.get("schema"))
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("pass the database URL: alembic -x url=sqlite:///path.db upgrade head")
    with create_engine(url).begin() as c:
        _run(c, None)
