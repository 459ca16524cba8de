"""Tenant endpoints: the host names each tenant is reached at.

``tenant_hosts`` holds each tenant's slug (reached as ``<slug>.<base domain>``) and the
custom domains the operator set for it. A control-plane table (no row-level security, no
``tenant_id`` column: the catalog-driven purge of a deleted tenant keeps its rows, which
hold its names back from other tenants for the quarantine). Tenants that exist before this
revision get no slug; the operator gives them one (``PUT /admin/tenants/{id}/endpoint``).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from patinox.storage._schema import UTCDateTime

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenant_hosts",
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("owner_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("released_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tenant_hosts")),
    )
    op.create_index("ix_tenant_hosts_owner_id", "tenant_hosts", ["owner_id"])


def downgrade() -> None:
    op.drop_index("ix_tenant_hosts_owner_id", table_name="tenant_hosts")
    op.drop_table("tenant_hosts")
