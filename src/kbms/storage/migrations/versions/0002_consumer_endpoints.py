"""consumer endpoints: list filters, tags, the change feed, full-text search

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

The search objects are each engine's own (see kbms.storage.schema.SEARCH_OBJECTS): an FTS5 table on SQLite, a
tsvector with a GIN index on PostgreSQL. Conversations stored before this revision get their tags, their search
document and a "created" change, so the feed and search cover them too.

Frozen: it imports nothing of kbms. The search document is made here as kbms.search made it on that date (the words
of the subject and of each message's text, folded), from the stored detail JSON, so a later change to the model or
to the search code cannot change what this revision does.
"""

from __future__ import annotations

import json
import re
import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "changes",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column(
            "conversation_id",
            sa.String(length=36).with_variant(sa.String(length=36, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("workspace", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("changed_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_changes")),
    )
    op.create_table(
        "conversation_tags",
        sa.Column("conversation_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_pk"],
            ["conversations.pk"],
            name=op.f("fk_conversation_tags_conversation_pk"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_pk", "tag", name=op.f("pk_conversation_tags")),
        sqlite_with_rowid=False,
    )
    with op.batch_alter_table("conversation_tags", schema=None) as batch_op:
        batch_op.create_index("ix_conversation_tags_tag", ["tag", "conversation_pk"], unique=False)

    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_conversations_live_provider",
            ["provider", sa.literal_column("updated_at DESC"), sa.literal_column("id DESC")],
            unique=False,
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )
        batch_op.create_index(
            "ix_conversations_live_state",
            ["state", sa.literal_column("updated_at DESC"), sa.literal_column("id DESC")],
            unique=False,
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )
        batch_op.create_index(
            "ix_conversations_live_workspace",
            ["workspace", sa.literal_column("updated_at DESC"), sa.literal_column("id DESC")],
            unique=False,
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )

    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # The words are folded and split by kbms.search: the tokenizer only splits on the spaces between them.
        op.execute("CREATE VIRTUAL TABLE search_index USING fts5(document, tokenize = 'unicode61 remove_diacritics 0')")
    else:
        op.execute(
            "CREATE TABLE search_documents ("
            " conversation_pk BIGINT PRIMARY KEY REFERENCES conversations (pk) ON DELETE CASCADE,"
            " tsv TSVECTOR NOT NULL)"
        )
        op.execute("CREATE INDEX ix_search_documents_tsv ON search_documents USING GIN (tsv)")
    _index_existing(bind)


WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    """Runs of letters and digits, accents dropped (NFKD without combining marks) and case folded."""
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()
    return WORD.findall(folded)


def _document(detail: dict[str, object]) -> str:
    """The indexed text of a stored conversation detail: its subject's and messages' words, separated by spaces."""
    messages = detail.get("messages") or []
    assert isinstance(messages, list)
    parts = [detail.get("subject") or "", *(message.get("content") or "" for message in messages)]
    return " ".join(" ".join(_words(part)) for part in parts if isinstance(part, str) and part)


def _index_existing(bind: sa.Connection) -> None:
    # A thousand at a time: a database of millions of conversations must not have to fit in memory.
    select = sa.text(
        "SELECT pk, id, provider, workspace, external_id, revision, changed_at, detail FROM conversations"
        " WHERE deleted_at IS NULL AND pk > :after ORDER BY pk LIMIT 1000"
    )
    insert_tag = sa.text("INSERT INTO conversation_tags (conversation_pk, tag) VALUES (:pk, :tag)")
    if bind.dialect.name == "sqlite":
        insert_document = sa.text("INSERT INTO search_index (rowid, document) VALUES (:pk, :document)")
    else:
        insert_document = sa.text(
            "INSERT INTO search_documents (conversation_pk, tsv) VALUES (:pk, to_tsvector('simple', :document))"
        )
    insert_change = sa.text(
        "INSERT INTO changes (conversation_id, provider, workspace, external_id, action, revision, changed_at)"
        " VALUES (:id, :provider, :workspace, :external_id, 'created', :revision, :changed_at)"
    )
    after = 0
    while rows := [dict(row) for row in bind.execute(select, {"after": after}).mappings()]:
        for row in rows:
            detail = json.loads(row["detail"])
            for tag in dict.fromkeys(detail.get("tags") or []):
                bind.execute(insert_tag, {"pk": row["pk"], "tag": tag})
            bind.execute(insert_document, {"pk": row["pk"], "document": _document(detail)})
            bind.execute(insert_change, {key: value for key, value in row.items() if key not in ("pk", "detail")})
        after = rows[-1]["pk"]


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE search_index")
    else:
        op.execute("DROP TABLE search_documents")
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_conversations_live_workspace",
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )
        batch_op.drop_index(
            "ix_conversations_live_state",
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )
        batch_op.drop_index(
            "ix_conversations_live_provider",
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )

    with op.batch_alter_table("conversation_tags", schema=None) as batch_op:
        batch_op.drop_index("ix_conversation_tags_tag")

    op.drop_table("conversation_tags")
    op.drop_table("changes")
