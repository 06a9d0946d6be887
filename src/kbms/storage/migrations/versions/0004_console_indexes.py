"""console: live conversations per provider and workspace; rejected deliveries by received time

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Frozen: it imports nothing of kbms. Two indexes for the operator console's overview and rejects pages.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LIVE = sa.text("deleted_at IS NULL")
REJECTED = sa.text("outcome = 'rejected'")


def upgrade() -> None:
    op.create_index(
        "ix_conversations_live_provider_workspace",
        "conversations",
        ["provider", "workspace"],
        unique=False,
        sqlite_where=LIVE,
        postgresql_where=LIVE,
    )
    op.create_index(
        "ix_ledger_rejected",
        "ledger",
        ["received_at", "pk"],
        unique=False,
        sqlite_where=REJECTED,
        postgresql_where=REJECTED,
    )


def downgrade() -> None:
    op.drop_index("ix_ledger_rejected", table_name="ledger")
    op.drop_index("ix_conversations_live_provider_workspace", table_name="conversations")
