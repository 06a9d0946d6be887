"""PostgreSQL's SQL where it differs: the upsert, and search on the tsvectors of ``search_documents``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

from sqlalchemy import ColumnElement, Connection, Subquery, bindparam, column, func, select, text
from sqlalchemy import table as table_
from sqlalchemy.dialects.postgresql import insert

from kbms.storage.schema import conversations
from kbms.storage.statements import SqlFlavor

FEED_LOCK = 0x66656564  # "feed" in ASCII: the advisory lock that orders the change feed


def ranked(conditions: Sequence[ColumnElement[bool]]) -> Subquery:
    """The newest ``b_window`` matches of ``b_query`` that pass ``conditions``, with their ts_rank scores."""
    documents = table_("search_documents", column("conversation_pk"), column("tsv"))
    query = func.to_tsquery("simple", bindparam("b_query"))
    # The newest matches first (ts_rank reads each whole tsvector: only for the window's rows).
    newest = select(documents.c.conversation_pk.label("pk")).where(documents.c.tsv.op("@@")(query))
    if conditions:
        newest = newest.join(conversations, conversations.c.pk == documents.c.conversation_pk).where(*conditions)
    chosen = newest.order_by(documents.c.conversation_pk.desc()).limit(bindparam("b_window")).subquery("newest")
    return (
        select(chosen.c.pk, func.ts_rank(documents.c.tsv, query).label("score"))
        .select_from(chosen.join(documents, documents.c.conversation_pk == chosen.c.pk))
        .subquery("ranked")
    )


def pipelined(conn: Connection) -> AbstractContextManager[object]:
    """psycopg's pipeline mode on the connection's driver: the block's statements go in one round trip."""
    return conn.connection.driver_connection.pipeline()  # type: ignore[union-attr, no-any-return]


def tsquery(terms: Sequence[str]) -> str:
    """A ``to_tsquery('simple', ...)`` expression: terms are letters and digits only, all required."""
    return " & ".join(terms)


FLAVOR = SqlFlavor(
    insert=insert,
    index_document=text(
        "INSERT INTO search_documents (conversation_pk, tsv) VALUES (:b_pk, to_tsvector('simple', :b_document))"
        " ON CONFLICT (conversation_pk) DO UPDATE SET tsv = EXCLUDED.tsv"
    ),
    unindex=text("DELETE FROM search_documents WHERE conversation_pk = :b_pk"),
    # Inside each write's savepoint: PostgreSQL refuses a tsvector over 1 MB, and that refusal must fail this write
    # alone, not its whole batch.
    defer_documents=False,
    ranked=ranked,
    search_query=tsquery,
    # Sequence values are handed out in one order and transactions commit in another: writers draw the feed's
    # numbers under one transaction-scoped lock (see kbms.storage.feed.flush_changes).
    feed_lock=text(f"SELECT pg_advisory_xact_lock({FEED_LOCK})"),
    pipelined=pipelined,
    late_writes=True,
    # Right after a bulk load, before autovacuum has analyzed the tables, the planner guessed 500 rows for a common
    # word and ranked all its matches (160 ms at 100,000 conversations) instead of walking the newest (6.5 ms); and
    # during one, a batch's ledger lookup scanned every row of its provider (8.5 s at 540,000).
    analyze=text("ANALYZE conversations, search_documents, ledger"),
)
