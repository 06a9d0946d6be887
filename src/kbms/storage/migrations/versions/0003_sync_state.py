"""sync state: sources, the fetch queue, dead letters; completeness columns on conversations

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

Frozen: it imports nothing of kbms. Columns are added with ``ADD COLUMN`` (no table copy on SQLite): the new
conversation columns are nullable or have a default, so existing rows need no rewrite.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    op.add_column("conversations", sa.Column("provider_count", sa.Integer(), nullable=True))
    op.add_column("conversations", sa.Column("truncated", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index(
        "ix_conversations_live_truncated",
        "conversations",
        [sa.literal_column("updated_at DESC"), sa.literal_column("id DESC")],
        unique=False,
        sqlite_where=sa.text("deleted_at IS NULL AND truncated = 1"),
        postgresql_where=sa.text("deleted_at IS NULL AND truncated"),
    )
    op.create_table(
        "sync_sources",
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("workspace", sa.Text(), nullable=False),
        sa.Column("checkpoint", sa.BigInteger(), nullable=True),
        sa.Column("cursor", sa.Text(), nullable=True),
        sa.Column("pass_started_at", sa.BigInteger(), nullable=True),
        sa.Column("pass_finished_at", sa.BigInteger(), nullable=True),
        sa.Column("pass_outcome", sa.String(length=16), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("listed", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("fetched", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("stored", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("rate_limit_waits", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("provider", "workspace", name=op.f("pk_sync_sources")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "sync_jobs",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("workspace", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger(), nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.BigInteger(), nullable=True),
        sa.Column("listed_updated_at", sa.BigInteger(), nullable=True),
        sa.Column("prefetched", sa.LargeBinary(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("first_failed_at", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_sync_jobs")),
    )
    op.create_index(
        "ix_sync_jobs_pending",
        "sync_jobs",
        ["provider", "workspace", "external_id"],
        unique=True,
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )
    op.create_index("ix_sync_jobs_due", "sync_jobs", ["provider", "workspace", "next_attempt_at", "pk"], unique=False)
    op.create_index("ix_sync_jobs_conversation", "sync_jobs", ["provider", "workspace", "external_id"], unique=False)
    op.create_table(
        "sync_dead_letters",
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("workspace", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("first_failed_at", sa.BigInteger(), nullable=False),
        sa.Column("dead_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "workspace", "external_id", name=op.f("pk_sync_dead_letters")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("sync_dead_letters")
    op.drop_index("ix_sync_jobs_conversation", table_name="sync_jobs")
    op.drop_index("ix_sync_jobs_due", table_name="sync_jobs")
    op.drop_index("ix_sync_jobs_pending", table_name="sync_jobs", sqlite_where=PENDING, postgresql_where=PENDING)
    op.drop_table("sync_jobs")
    op.drop_table("sync_sources")
    op.drop_index("ix_conversations_live_truncated", table_name="conversations")
    # ALTER TABLE ... DROP COLUMN: SQLite has it since 3.35 (once no index names the column).
    op.drop_column("conversations", "truncated")
    op.drop_column("conversations", "provider_count")
