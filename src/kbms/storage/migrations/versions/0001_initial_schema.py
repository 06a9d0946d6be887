"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column(
            "id", sa.String(length=36).with_variant(sa.String(length=36, collation="C"), "postgresql"), nullable=False
        ),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("workspace", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=True),
        sa.Column("channel", sa.Text(), nullable=True),
        sa.Column("assignee_participant_id", sa.Text(), nullable=True),
        sa.Column("header", sa.Text(), nullable=False),
        sa.Column("participant_count", sa.Integer(), nullable=False),
        sa.Column("message_count", sa.Integer(), nullable=False),
        sa.Column("last_message_at", sa.BigInteger(), nullable=True),
        sa.Column("last_message_preview", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("changed_at", sa.BigInteger(), nullable=False),
        sa.Column("deleted_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_conversations")),
        sa.UniqueConstraint("id", name=op.f("uq_conversations_id")),
        sa.UniqueConstraint(
            "provider", "workspace", "external_id", name=op.f("uq_conversations_provider_workspace_external_id")
        ),
    )
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_conversations_live_updated",
            [sa.literal_column("updated_at DESC"), sa.literal_column("id DESC")],
            unique=False,
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )

    op.create_table(
        "redactions",
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("workspace", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "workspace", "external_id", "message_id", name=op.f("pk_redactions")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "events",
        sa.Column("conversation_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("provider_type", sa.Text(), nullable=True),
        sa.Column("actor_participant_id", sa.Text(), nullable=True),
        sa.Column("occurred_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_pk"], ["conversations.pk"], name=op.f("fk_events_conversation_pk"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("conversation_pk", "event_id", name=op.f("pk_events")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "ledger",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("workspace", sa.Text(), nullable=False),
        sa.Column("named_workspace", sa.Text(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=True),
        sa.Column("delivery_key", sa.Text(), nullable=False),
        sa.Column("body_hash", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("conversation_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_pk"], ["conversations.pk"], name=op.f("fk_ledger_conversation_pk"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_ledger")),
        sa.UniqueConstraint("provider", "delivery_key", name=op.f("uq_ledger_provider_delivery_key")),
    )
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.create_index("ix_ledger_conversation", ["conversation_pk"], unique=False)
        batch_op.create_index("ix_ledger_received", ["received_at", "pk"], unique=False)

    op.create_table(
        "messages",
        sa.Column("conversation_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("author_participant_id", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=True),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("content_html", sa.Text(), nullable=True),
        sa.Column("visibility", sa.String(length=16), nullable=False),
        sa.Column("attachments", sa.Text(), nullable=False),
        sa.Column("redacted", sa.Boolean(), nullable=False),
        sa.Column("provider_type", sa.Text(), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_pk"], ["conversations.pk"], name=op.f("fk_messages_conversation_pk"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("conversation_pk", "message_id", name=op.f("pk_messages")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "participants",
        sa.Column("conversation_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("participant_id", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("first_seen", sa.BigInteger(), nullable=False),
        sa.Column("registers", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_pk"], ["conversations.pk"], name=op.f("fk_participants_conversation_pk"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("conversation_pk", "participant_id", name=op.f("pk_participants")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("participants")
    op.drop_table("messages")
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_received")
        batch_op.drop_index("ix_ledger_conversation")

    op.drop_table("ledger")
    op.drop_table("events")
    op.drop_table("redactions")
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_conversations_live_updated",
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )

    op.drop_table("conversations")
