"""Conversation threads and their messages.

``threads`` holds a tenant's conversation threads (their metadata sealed) and
``thread_messages`` the messages of each (content sealed like run payloads, AAD
``thread_messages.content``). Tenant tables like ``runs``: in every placement (pool tables,
a bridge schema, a silo database or file) and with forced row-level security on
PostgreSQL. A thread's messages go with it (``ON DELETE CASCADE``).

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from patinox.storage._schema import UTCDateTime

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POLICY = (
    "tenant_id = current_setting('patinox.tenant_id', true) "
    "OR current_setting('patinox.scope', true) = 'control'"
)


def upgrade() -> None:
    op.create_table(
        "threads",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("metadata", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_threads")),
    )
    op.create_index("ix_threads_tenant_id_created_at", "threads", ["tenant_id", "created_at"])
    op.create_table(
        "thread_messages",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("thread_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id", "thread_id"],
            ["threads.tenant_id", "threads.id"],
            name=op.f("fk_thread_messages_tenant_id_threads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_thread_messages")),
    )
    op.create_index(
        "uq_thread_messages_tenant_id_thread_id_position",
        "thread_messages",
        ["tenant_id", "thread_id", "position"],
        unique=True,
    )
    if op.get_bind().dialect.name == "postgresql":
        for table in ("threads", "thread_messages"):
            op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
            op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
            op.execute(f"CREATE POLICY tenant_isolation ON {table} USING ({POLICY}) WITH CHECK ({POLICY})")


def downgrade() -> None:
    op.drop_index("uq_thread_messages_tenant_id_thread_id_position", table_name="thread_messages")
    op.drop_table("thread_messages")
    op.drop_index("ix_threads_tenant_id_created_at", table_name="threads")
    op.drop_table("threads")
