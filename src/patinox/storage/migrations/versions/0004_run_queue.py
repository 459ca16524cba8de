"""The durable run queue (weighted fair queueing), durable quota counters, and the
storage-move write hold.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from patinox.storage._schema import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POLICY = (
    "tenant_id = current_setting('patinox.tenant_id', true) "
    "OR current_setting('patinox.scope', true) = 'control'"
)


def upgrade() -> None:
    utc = UTCDateTime
    op.create_table(
        "run_queue",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("finish_tag", sa.Float(), nullable=False),
        sa.Column("max_running", sa.Integer(), nullable=False),
        sa.Column("reserved_tokens", sa.Integer(), nullable=False),
        sa.Column("quota_period", sa.String(length=20), nullable=False),
        sa.Column("enqueued_at", utc(), nullable=False),
        sa.Column("claimed_by", sa.String(length=80), nullable=True),
        sa.Column("lease_until", utc(), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "run_id", name=op.f("pk_run_queue")),
    )
    op.create_index("ix_run_queue_pick", "run_queue", ["claimed_by", "priority", "finish_tag"])
    op.create_table(
        "queue_tenants",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("last_tag", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_queue_tenants")),
    )
    op.create_table(
        "quota_ledger",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("quota", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=20), nullable=False),
        sa.Column("spent", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("reserved", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "quota", "period", name=op.f("pk_quota_ledger")),
    )
    op.create_table(
        "queue_clock",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("virtual_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queue_clock")),
    )
    op.execute("INSERT INTO queue_clock (id, virtual_time) VALUES (1, 0)")
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("moving_to", sa.String(length=10), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        for table in ("run_queue", "queue_tenants", "quota_ledger"):
            op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
            op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
            op.execute(f"CREATE POLICY tenant_isolation ON {table} USING ({POLICY}) WITH CHECK ({POLICY})")


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("moving_to")
    op.drop_table("queue_clock")
    op.drop_table("quota_ledger")
    op.drop_table("queue_tenants")
    op.drop_index("ix_run_queue_pick", table_name="run_queue")
    op.drop_table("run_queue")
