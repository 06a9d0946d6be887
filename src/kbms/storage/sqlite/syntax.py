"""SQLite's SQL where it differs: the upsert, and search on the FTS5 table ``search_index``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

from sqlalchemy import ColumnElement, Subquery, bindparam, column, func, literal_column, select, text
from sqlalchemy import table as table_
from sqlalchemy.dialects.sqlite import insert

from kbms.storage.schema import conversations
from kbms.storage.statements import SqlFlavor


def ranked(conditions: Sequence[ColumnElement[bool]]) -> Subquery:
    """The newest ``b_window`` matches of ``b_query`` that pass ``conditions``, with their bm25 scores."""
    index = table_("search_index", column("rowid"))
    # bm25 is lower for better matches: negated, higher is better on both engines. The filters join in the window's
    # query, so that a filtered search ranks the newest matches that pass the filters.
    window = select(index.c.rowid.label("pk"), (-func.bm25(literal_column("search_index"))).label("score"))
    window = window.where(literal_column("search_index").op("MATCH")(bindparam("b_query")))
    if conditions:
        window = window.join(conversations, conversations.c.pk == index.c.rowid).where(*conditions)
    return window.order_by(index.c.rowid.desc()).limit(bindparam("b_window")).subquery("ranked")


def fts5_query(terms: Sequence[str]) -> str:
    """An FTS5 MATCH expression: every term quoted (so none is an operator), all required."""
    return " ".join(f'"{term}"' for term in terms)


FLAVOR = SqlFlavor(
    insert=insert,
    index_document=text("INSERT INTO search_index (rowid, document) VALUES (:b_pk, :b_document)"),
    unindex=text("DELETE FROM search_index WHERE rowid = :b_pk"),
    # FTS5 writes out its pending index data at each savepoint: at the end, a batch's documents make one segment.
    defer_documents=True,
    ranked=ranked,
    search_query=fts5_query,
    feed_lock=None,  # one writer at a time
    pipelined=lambda _conn: nullcontext(),  # in process: no round trips to save
    late_writes=False,
    analyze=None,  # lists and searches take their index whatever the statistics (FTS5 for searches)
)
