"""Idempotency keys, and cancel requests on run queue entries.

``idempotency_keys`` keeps, per tenant, each ``Idempotency-Key`` a POST that creates
something was sent with: the request's fingerprint and, once it finished, its response
(sealed like run payloads). A tenant table like ``runs``: in every placement (pool tables,
a bridge schema, a silo database or file) and with forced row-level security on
PostgreSQL. ``run_queue.cancel_requested_at`` is set when a tenant cancels a run another
process is running; that process polls for it and cancels the run there.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from patinox.storage._schema import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POLICY = (
    "tenant_id = current_setting('patinox.tenant_id', true) "
    "OR current_setting('patinox.scope', true) = 'control'"
)


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index(
        "ix_idempotency_keys_tenant_id_expires_at", "idempotency_keys", ["tenant_id", "expires_at"]
    )
    with op.batch_alter_table("run_queue") as batch:
        batch.add_column(
            sa.Column("cancel_requested_at", UTCDateTime(), nullable=True, server_default=sa.text("NULL"))
        )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE idempotency_keys ENABLE ROW LEVEL SECURITY")
        op.execute("ALTER TABLE idempotency_keys FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON idempotency_keys USING ({POLICY}) WITH CHECK ({POLICY})"
        )


def downgrade() -> None:
    with op.batch_alter_table("run_queue") as batch:
        batch.drop_column("cancel_requested_at")
    op.drop_index("ix_idempotency_keys_tenant_id_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
