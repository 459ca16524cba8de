"""Tenant secrets.

``secrets`` keeps, per tenant, named values (a provider key for BYOK, a token a tool sends)
sealed under the tenant's DEK like run payloads (AAD: ``secrets.value`` and the secret's
name). A tenant table like ``runs``: in every placement (pool tables, a bridge schema, a
silo database or file) and with forced row-level security on PostgreSQL.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from patinox.storage._schema import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POLICY = (
    "tenant_id = current_setting('patinox.tenant_id', true) "
    "OR current_setting('patinox.scope', true) = 'control'"
)


def upgrade() -> None:
    op.create_table(
        "secrets",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name", name=op.f("pk_secrets")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE secrets ENABLE ROW LEVEL SECURITY")
        op.execute("ALTER TABLE secrets FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_isolation ON secrets USING ({POLICY}) WITH CHECK ({POLICY})")


def downgrade() -> None:
    op.drop_table("secrets")
