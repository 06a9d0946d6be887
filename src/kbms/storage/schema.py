"""The tables, in SQLAlchemy Core: one definition for SQLite and PostgreSQL.

Migrations (``storage/migrations``) create exactly this; a test compares the two. Timestamps are integer
microseconds since the epoch (UTC): exact, engine-independent, and they sort. JSON columns are plain text so both
engines return the bytes that were written.

The unique keys are what make ingestion exact under concurrency; no read-then-write check in Python replaces them:
- ``conversations (provider, workspace, external_id)``: one row per provider conversation;
- ``messages``/``events``/``participants`` keyed by ``(conversation_pk, provider id)``;
- ``ledger (provider, delivery_key)``: one row per delivery (a notification id, or the body's hash);
- ``sync_jobs (provider, workspace, external_id) WHERE state = 'pending'``: one queued fetch per conversation.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)

# Named constraints, so migrations can refer to them on both engines.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite's INTEGER PRIMARY KEY is the rowid; PostgreSQL needs BIGINT to count past 2**31.
PrimaryKey = BigInteger().with_variant(Integer(), "sqlite")
# Conversation ids order pages (after updated_at), so both engines must compare them bytewise: SQLite does by
# default, PostgreSQL only with the "C" collation (its default collations skip hyphens).
ConversationId = String(36).with_variant(String(36, collation="C"), "postgresql")

conversations = Table(
    "conversations",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("id", ConversationId, nullable=False, unique=True),
    Column("provider", String(64), nullable=False),
    Column("workspace", Text, nullable=False),
    Column("external_id", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("subject", Text),
    Column("state", String(16)),
    Column("channel", Text),
    Column("assignee_participant_id", Text),
    # {field: [version, value]} for every conversation field a payload has set (see kbms.merge).
    Column("header", Text, nullable=False),
    Column("participant_count", Integer, nullable=False),
    Column("message_count", Integer, nullable=False),
    Column("last_message_at", BigInteger),
    Column("last_message_preview", Text),
    # The read model: the detail JSON exactly as GET /internal/conversations/{id} serves it.
    Column("detail", Text, nullable=False),
    Column("changed_at", BigInteger, nullable=False),
    Column("deleted_at", BigInteger),
    # Completeness (issue 15): the provider's count (None: no payload said); truncated: above what it answered.
    Column("provider_count", Integer),
    Column("truncated", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("provider", "workspace", "external_id"),
)
# Keyset pagination, newest-updated first, over live conversations. The id breaks ties: it is the same on every
# engine (derived from the provider key), unlike pk, which PostgreSQL's sequences skip on conflicts.
Index(
    "ix_conversations_live_updated",
    conversations.c.updated_at.desc(),
    conversations.c.id.desc(),
    sqlite_where=text("deleted_at IS NULL"),
    postgresql_where=text("deleted_at IS NULL"),
)

# The list's filters, each with the list's order, over live conversations only.
for _column in ("provider", "workspace", "state"):
    Index(
        f"ix_conversations_live_{_column}",
        conversations.c[_column],
        conversations.c.updated_at.desc(),
        conversations.c.id.desc(),
        sqlite_where=text("deleted_at IS NULL"),
        postgresql_where=text("deleted_at IS NULL"),
    )
# The console's overview: live conversations per provider and workspace, counted from this index alone.
Index(
    "ix_conversations_live_provider_workspace",
    conversations.c.provider,
    conversations.c.workspace,
    sqlite_where=text("deleted_at IS NULL"),
    postgresql_where=text("deleted_at IS NULL"),
)
# ?truncated=true. SQLite uses a partial index only if the query repeats its terms: filter with ``== true()``.
Index(
    "ix_conversations_live_truncated",
    conversations.c.updated_at.desc(),
    conversations.c.id.desc(),
    sqlite_where=text("deleted_at IS NULL AND truncated = 1"),
    postgresql_where=text("deleted_at IS NULL AND truncated"),
)

participants = Table(
    "participants",
    metadata,
    Column("conversation_pk", PrimaryKey, ForeignKey("conversations.pk", ondelete="CASCADE"), nullable=False),
    Column("participant_id", Text, nullable=False),
    Column("role", String(16), nullable=False),
    Column("name", Text),
    Column("email", Text),
    Column("first_seen", BigInteger, nullable=False),
    # {attribute: [version, value]} for role, name and email (see kbms.merge).
    Column("registers", Text, nullable=False),
    PrimaryKeyConstraint("conversation_pk", "participant_id"),
    sqlite_with_rowid=False,
)

messages = Table(
    "messages",
    metadata,
    Column("conversation_pk", PrimaryKey, ForeignKey("conversations.pk", ondelete="CASCADE"), nullable=False),
    Column("message_id", Text, nullable=False),
    Column("author_participant_id", Text),
    Column("sent_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger),
    Column("content", Text, nullable=False),
    Column("content_html", Text),
    Column("visibility", String(16), nullable=False),
    Column("attachments", Text, nullable=False),
    Column("redacted", Boolean, nullable=False),
    Column("provider_type", Text),
    # The version (payload updated_at) of the payload this copy came from, minus 2**62 for a partial copy (a
    # webhook's plain text); see kbms.merge.message_key.
    Column("version", BigInteger, nullable=False),
    PrimaryKeyConstraint("conversation_pk", "message_id"),
    sqlite_with_rowid=False,
)

events = Table(
    "events",
    metadata,
    Column("conversation_pk", PrimaryKey, ForeignKey("conversations.pk", ondelete="CASCADE"), nullable=False),
    Column("event_id", Text, nullable=False),
    Column("type", String(32), nullable=False),
    Column("provider_type", Text),
    Column("actor_participant_id", Text),
    Column("occurred_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("conversation_pk", "event_id"),
    sqlite_with_rowid=False,
)

ledger = Table(
    "ledger",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("provider", String(64), nullable=False),
    Column("workspace", Text, nullable=False),
    # The workspace the request named (``?workspace=``), if any: re-reading the payload (kbms reprocess) decides
    # its workspace the way the request did, where a provider may read it from the payload.
    Column("named_workspace", Text),
    Column("kind", String(16), nullable=False),  # push | webhook | pull
    # False only for webhooks accepted unsigned (KBMS_ALLOW_UNSIGNED_WEBHOOKS): they cannot be told apart otherwise.
    Column("verified", Boolean, nullable=False),
    Column("topic", Text),
    Column("delivery_key", Text, nullable=False),
    Column("body_hash", String(64), nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("outcome", String(16), nullable=False),  # created | updated | unchanged | ignored | rejected
    Column("error", Text),
    Column("conversation_pk", PrimaryKey, ForeignKey("conversations.pk", ondelete="SET NULL")),
    Column("body", LargeBinary, nullable=False),
    UniqueConstraint("provider", "delivery_key"),
)
Index("ix_ledger_received", ledger.c.received_at, ledger.c.pk)
Index("ix_ledger_conversation", ledger.c.conversation_pk)
# The console's rejects, newest first: the few rejected rows among the many accepted (storage/overview.py).
Index(
    "ix_ledger_rejected",
    ledger.c.received_at,
    ledger.c.pk,
    sqlite_where=text("outcome = 'rejected'"),
    postgresql_where=text("outcome = 'rejected'"),
)

# Redacted messages, by the conversation's provider key rather than its row: a deletion purges a conversation's
# content, but the redaction must still be applied to every raw payload of it that arrives or is linked later.
redactions = Table(
    "redactions",
    metadata,
    Column("provider", String(64), nullable=False),
    Column("workspace", Text, nullable=False),
    Column("external_id", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    Column("message", Text, nullable=False),  # the redacted message (model JSON): what replaces the old text
    PrimaryKeyConstraint("provider", "workspace", "external_id", "message_id"),
    sqlite_with_rowid=False,
)

# A conversation's tags, one row each: the list's ``tag`` filter.
conversation_tags = Table(
    "conversation_tags",
    metadata,
    Column("conversation_pk", PrimaryKey, ForeignKey("conversations.pk", ondelete="CASCADE"), nullable=False),
    Column("tag", Text, nullable=False),
    PrimaryKeyConstraint("conversation_pk", "tag"),
    sqlite_with_rowid=False,
)
Index("ix_conversation_tags_tag", conversation_tags.c.tag, conversation_tags.c.conversation_pk)

# The change feed: one row per committed change of a conversation, numbered in commit order (see storage/feed.py,
# ``flush_changes``, for how PostgreSQL keeps that order under concurrent writers).
changes = Table(
    "changes",
    metadata,
    Column("seq", PrimaryKey, primary_key=True, autoincrement=True),
    Column("conversation_id", ConversationId, nullable=False),
    Column("provider", String(64), nullable=False),
    Column("workspace", Text, nullable=False),
    Column("external_id", Text, nullable=False),
    Column("action", String(16), nullable=False),  # created | updated | deleted
    Column("revision", Integer, nullable=False),
    Column("changed_at", BigInteger, nullable=False),
)

# Per source pulled from (issue 15; storage/sync.py; never a token): its listing, last pass, totals, lister's lease.
sync_sources = Table(
    "sync_sources",
    metadata,
    Column("provider", String(64), nullable=False),
    Column("workspace", Text, nullable=False),
    Column("checkpoint", BigInteger),  # a watermark (microseconds): listed and queued up to here
    Column("cursor", Text),  # the provider's opaque position of the last page whose items are all queued
    Column("pass_started_at", BigInteger),
    Column("pass_finished_at", BigInteger),
    Column("pass_outcome", String(16)),
    Column("last_error", Text),
    *(
        Column(name, BigInteger, nullable=False, server_default=text("0"))
        for name in ("listed", "fetched", "stored", "requests", "rate_limit_waits")
    ),
    Column("lease_owner", Text),
    Column("lease_until", BigInteger),
    PrimaryKeyConstraint("provider", "workspace"),
    sqlite_with_rowid=False,
)

# Fetches to do: pending, or running under a lease (a crashed process's jobs come back when it expires). Done jobs
# are deleted by pk, so that one queued meanwhile for the same conversation survives.
sync_jobs = Table(
    "sync_jobs",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("provider", String(64), nullable=False),
    Column("workspace", Text, nullable=False),
    Column("external_id", Text, nullable=False),
    Column("reason", String(16), nullable=False),  # backfill | sweep | webhook | completeness
    Column("state", String(16), nullable=False),  # pending | running
    Column("attempts", Integer, nullable=False),  # claims so far: counted when claimed, so a crash counts too
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("lease_owner", Text),
    Column("lease_until", BigInteger),
    Column("listed_updated_at", BigInteger),  # the version the listing saw; None: unknown (always fetch)
    Column("prefetched", LargeBinary),  # the listing's own copy, when it saves a request (a Zendesk ticket)
    Column("last_error", Text),
    Column("first_failed_at", BigInteger),
    Column("created_at", BigInteger, nullable=False),
)
# One pending job per conversation (the queue's upsert); a claim skips one while its conversation's job runs.
_job_key = (sync_jobs.c.provider, sync_jobs.c.workspace, sync_jobs.c.external_id)
_pending = text("state = 'pending'")
Index("ix_sync_jobs_pending", *_job_key, unique=True, sqlite_where=_pending, postgresql_where=_pending)
Index("ix_sync_jobs_conversation", *_job_key)
Index("ix_sync_jobs_due", sync_jobs.c.provider, sync_jobs.c.workspace, sync_jobs.c.next_attempt_at, sync_jobs.c.pk)

# Conversations whose fetch failed too often: kept apart (they do not hold a source's checkpoint) until retried.
sync_dead_letters = Table(
    "sync_dead_letters",
    metadata,
    Column("provider", String(64), nullable=False),
    Column("workspace", Text, nullable=False),
    Column("external_id", Text, nullable=False),
    Column("reason", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("first_failed_at", BigInteger, nullable=False),
    Column("dead_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("provider", "workspace", "external_id"),
    sqlite_with_rowid=False,
)

# Full-text search lives outside this metadata, because each engine has its own: an FTS5 table ``search_index`` on
# SQLite, a ``search_documents`` table with a tsvector and a GIN index on PostgreSQL (migration 0002).
SEARCH_OBJECTS = ("search_index", "search_documents")


def declared(name: str | None, type_: str) -> bool:
    """Whether a database object belongs to this metadata (for Alembic: the search objects are hand-made)."""
    if type_ == "table" and name is not None:
        return not name.startswith(SEARCH_OBJECTS)
    if type_ == "index" and name is not None:
        return not name.startswith(("ix_search_",))
    return True
