"""Sealed payloads stored as bytes: ``runs.input``, ``runs.output`` and ``memory.value``.

They were text, ``"ptxenc1:" + base64(blob)``: a third larger than the blob, which made
every encrypted write and read move more bytes than needed. They become binary columns
holding the blob itself (``bytea`` on PostgreSQL, ``BLOB`` on SQLite); existing values
are decoded in place. A value without the prefix (never written by Patinox) is kept as
its UTF-8 bytes, and still fails to decrypt.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PREFIX = "ptxenc1:"
#: (table, key columns, sealed columns)
SEALED = (("runs", ("tenant_id", "id"), ("input", "output")), ("memory", ("tenant_id", "key"), ("value",)))
NULLABLE = {("runs", "input"): False, ("runs", "output"): True, ("memory", "value"): False}


def _blob(value: str | bytes | None) -> bytes | None:
    """The blob of an old value (text, or the text's bytes after SQLite's CAST in a batch
    copy); a blob stays as it is (blobs start with 0x01, never with the prefix)."""
    if value is None:
        return None
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if raw.startswith(PREFIX.encode()):
        return base64.b64decode(raw[len(PREFIX) :])
    return raw


def _text(value: str | bytes | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return PREFIX + base64.b64encode(value).decode("ascii")


def _to_blob_sql(col: str) -> str:
    body = f"substr({col}, {len(PREFIX) + 1})"
    return (
        f"CASE WHEN left({col}, {len(PREFIX)}) = '{PREFIX}' THEN decode({body}, 'base64') "
        f"ELSE convert_to({col}, 'UTF8') END"
    )


def _to_text_sql(col: str) -> str:
    return f"CASE WHEN {col} IS NULL THEN NULL ELSE '{PREFIX}' || encode({col}, 'base64') END"


def _retype(
    type_: sa.types.TypeEngine[Any], using: Callable[[str], str], convert: Callable[[Any], Any]
) -> None:
    """Give every sealed column ``type_``: on PostgreSQL in place (``USING``), on SQLite by
    a table rebuild, with the values converted by ``convert`` (before the rebuild to text,
    after it to bytes, so SQLite's copy never casts a value it cannot hold)."""
    bind = op.get_bind()
    for table, keys, columns in SEALED:
        if bind.dialect.name == "postgresql":
            for col in columns:
                op.alter_column(
                    table,
                    col,
                    type_=type_,
                    existing_nullable=NULLABLE[(table, col)],
                    postgresql_using=using(col),
                )
            continue
        if convert is _text:
            _convert(bind, table, keys, columns, convert)
        with op.batch_alter_table(table) as batch:
            for col in columns:
                batch.alter_column(col, type_=type_, existing_nullable=NULLABLE[(table, col)])
        if convert is _blob:
            _convert(bind, table, keys, columns, convert)


def upgrade() -> None:
    _retype(sa.LargeBinary(), _to_blob_sql, _blob)


def downgrade() -> None:
    _retype(sa.Text(), _to_text_sql, _text)


def _convert(
    bind: sa.Connection,
    table: str,
    keys: tuple[str, ...],
    columns: tuple[str, ...],
    fn: Callable[[Any], Any],
    batch: int = 500,
) -> None:
    """Rewrite ``columns`` of every row of ``table`` with ``fn`` where that changes them,
    ``batch`` rows read at a time (in key order, so memory stays bounded on large tables)."""
    cols = ", ".join(f'"{c}"' for c in (*keys, *columns))
    key_list = ", ".join(f'"{k}"' for k in keys)
    after = ", ".join(f":a{i}" for i in range(len(keys)))
    where = " AND ".join(f'"{k}" = :k{i}' for i, k in enumerate(keys))
    sets = ", ".join(f'"{c}" = :c{i}' for i, c in enumerate(columns))
    update = sa.text(f'UPDATE "{table}" SET {sets} WHERE {where}')
    first = sa.text(f'SELECT {cols} FROM "{table}" ORDER BY {key_list} LIMIT {batch}')
    rest = sa.text(
        f'SELECT {cols} FROM "{table}" WHERE ({key_list}) > ({after}) ORDER BY {key_list} LIMIT {batch}'
    )
    last: tuple[Any, ...] | None = None
    while True:
        if last is None:
            rows = bind.execute(first).all()
        else:
            rows = bind.execute(rest, {f"a{i}": v for i, v in enumerate(last)}).all()
        if not rows:
            return
        for row in rows:
            values = [bytes(v) if isinstance(v, memoryview) else v for v in row[len(keys) :]]
            new = [fn(v) for v in values]
            if new == values and all(type(a) is type(b) for a, b in zip(new, values, strict=True)):
                continue
            params = {f"k{i}": row[i] for i in range(len(keys))}
            params |= {f"c{i}": v for i, v in enumerate(new)}
            bind.execute(update, params)
        last = tuple(rows[-1][: len(keys)])
