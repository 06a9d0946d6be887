"""The change feed, the search documents and the ledger's settling updates: recorded on the connection as a write
goes, written at the end of its transaction (``flush_changes``), and forgotten when a write is rolled back to its
savepoint.

A conversation's tags are written at once (``write_index``); only its search document may take the side channel, on
the engines that defer it (``SqlFlavor.defer_documents``: SQLite).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from kbms.merge import ConversationState
from kbms.storage.statements import Sql

if TYPE_CHECKING:  # kbms.storage.state writes through this module
    from kbms.storage.state import Index

# The change feed, the search documents and the ledger's settling updates. A write records them on its connection
# as it goes; the store writes them at the end of the transaction, with ``flush_changes``, and drops those of a
# write rolled back to its savepoint (``discard_changes``).
# - The feed, at the end: on PostgreSQL the rows are numbered under a lock held until the commit, so the numbering
#   is the commit order (see ``flush_changes``); taking that lock last means a transaction holding it never waits
#   for anything else, and cannot deadlock with one that holds a row it needs.
# - SQLite's search documents, at the end and outside every savepoint: FTS5 writes out its pending index data at each
#   savepoint, and a statement that needs a statement journal opens one. Inline, every write of a batch flushed
#   its own small index segment (and the ledger's settling UPDATE, checked against its foreign key, paid about
#   65 us for it, profiled); at the end, the batch's documents go into one segment.
# - The ledger's settling updates (a delivery's outcome and conversation), at the end: on PostgreSQL they then go in
#   the commit's round trip, one fewer per write. Within the transaction, only a redaction's search for the raw
#   copies of a conversation reads what they write; it runs them first (``settled_ledger``).
# - On PostgreSQL, a write alone in its transaction (``writing_alone``) keeps all its statements that read nothing back
#   (a conversation's children, its row, tags and search document) until the commit, and they go in its round trip
#   too: a new conversation then costs three round trips in its transaction (claim, create, commit). Batches write
#   them at once, within each write's savepoint, where a value PostgreSQL refuses fails that write alone.
PENDING_CHANGES = "kbms.pending_changes"
PENDING_DOCUMENTS = "kbms.pending_documents"
PENDING_SETTLES = "kbms.pending_settles"
PENDING_WRITES = "kbms.pending_writes"  # present only while a write alone is under way (``writing_alone``)
Mark = tuple[int, int, int]


def writing_alone(sql: Sql, conn: Connection) -> None:
    """This transaction holds one write and no savepoint: where the engine has round trips to save
    (``SqlFlavor.late_writes``), what it reads nothing back from waits for the commit (``write``)."""
    if sql.late_writes:
        conn.info[PENDING_WRITES] = []


def write(sql: Sql, conn: Connection, statement: Any, params: dict[str, Any] | list[dict[str, Any]]) -> None:
    """A statement whose result nobody reads (``params``: a list for many rows): at once, or at the commit, in
    order, for a write alone (``writing_alone``)."""
    pending = conn.info.get(PENDING_WRITES)
    if pending is not None:
        pending.append((statement, params))
    elif isinstance(params, list):
        sql.run_many(conn, statement, params)
    else:
        sql.run(conn, statement, params)


def together(sql: Sql, conn: Connection) -> AbstractContextManager[object]:
    """A block of ``write``s in one round trip: nothing to do when they wait for the commit anyway."""
    return nullcontext() if PENDING_WRITES in conn.info else sql.pipelined(conn)


def record_change(conn: Connection, state: ConversationState, action: str, now: int) -> None:
    row = {
        "conversation_id": state.id,
        "provider": state.provider,
        "workspace": state.workspace,
        "external_id": state.external_id,
        "action": action,
        "revision": state.revision,
        "changed_at": now,
    }
    conn.info.setdefault(PENDING_CHANGES, []).append(row)


def settle_later(conn: Connection, claim: int, outcome: str, conversation_pk: int | None) -> None:
    """Record a claimed ledger row's outcome and conversation, written at the end of the transaction."""
    row = {"b_pk": claim, "outcome": outcome, "conversation_pk": conversation_pk}
    conn.info.setdefault(PENDING_SETTLES, []).append(row)


def settled_ledger(sql: Sql, conn: Connection) -> None:
    """Write the settling updates recorded so far, before a statement of this transaction reads the ledger's
    outcomes or conversations. They stay recorded, and are written again at the end (the same values): rolling the
    current write back to its savepoint undoes them all, and forgets only that write's own."""
    rows = conn.info.get(PENDING_SETTLES)
    if rows:
        sql.run_many(conn, sql.settle, rows)


def write_index(sql: Sql, conn: Connection, pk: int, index: Index | None, *, fresh: bool) -> None:
    """Replace a conversation's tags and search document (``index`` None: remove them, it is deleted).

    ``fresh``: the conversation has no tags or document yet. Where documents are deferred (SQLite), the document
    itself is written at the end of the transaction (see ``flush_changes``). Elsewhere (PostgreSQL) it is written
    here, inside the write's savepoint: PostgreSQL refuses a tsvector over 1 MB, and that refusal must fail this
    write alone, not its whole batch.
    """
    if not fresh:
        write(sql, conn, sql.untag, {"b_pk": pk})
    if index is not None and index.tags:
        write(sql, conn, sql.tag, [{"conversation_pk": pk, "tag": tag} for tag in index.tags])
    if sql.defer_documents:
        conn.info.setdefault(PENDING_DOCUMENTS, []).append((pk, None if index is None else index.document, fresh))
        return
    if not fresh:
        write(sql, conn, sql.unindex, {"b_pk": pk})
    if index is not None:
        write(sql, conn, sql.index_document, {"b_pk": pk, "b_document": index.document})


def pending_changes(conn: Connection) -> Mark:
    """How much this transaction has recorded so far (a mark for ``discard_changes``)."""
    info = conn.info
    return (
        len(info.get(PENDING_CHANGES, ())),
        len(info.get(PENDING_DOCUMENTS, ())),
        len(info.get(PENDING_SETTLES, ())),
    )


def discard_changes(conn: Connection, mark: Mark = (0, 0, 0)) -> None:
    """Forget what was recorded after ``mark`` (its write was rolled back)."""
    del conn.info.setdefault(PENDING_CHANGES, [])[mark[0] :]
    del conn.info.setdefault(PENDING_DOCUMENTS, [])[mark[1] :]
    del conn.info.setdefault(PENDING_SETTLES, [])[mark[2] :]
    if mark == (0, 0, 0):  # the whole transaction: a write alone is gone too (a savepoint never holds one)
        conn.info.pop(PENDING_WRITES, None)


def flush_changes(sql: Sql, conn: Connection) -> None:
    """Write the recorded ledger outcomes, search documents and changes; the last statements of a write transaction.

    On PostgreSQL, sequence values are handed out in one order and transactions commit in another, so a reader
    following ``seq`` could pass a number whose transaction commits later, and miss it for good. Here every writer
    takes one transaction-scoped advisory lock before it draws its numbers, and keeps it until its commit: the
    next writer draws only after the previous one has committed (PostgreSQL makes a commit visible before it
    releases the transaction's locks), so numbers become visible in increasing order and a reader that has seen
    ``seq`` n will never later see a smaller one (``sql.feed_lock``). SQLite has one writer at a time already.
    """
    writes = conn.info.pop(PENDING_WRITES, None)
    for statement, params in writes or ():
        write(sql, conn, statement, params)
    settled_ledger(sql, conn)
    conn.info.get(PENDING_SETTLES, []).clear()
    documents = conn.info.get(PENDING_DOCUMENTS)
    if documents:
        # The last document of each conversation wins; one that existed before this transaction is removed first.
        latest: dict[int, str | None] = {}
        stale: set[int] = set()
        for pk, document, fresh in documents:
            latest[pk] = document
            if not fresh:
                stale.add(pk)
        if stale:
            sql.run_many(conn, sql.unindex, [{"b_pk": pk} for pk in sorted(stale)])
        written = [{"b_pk": pk, "b_document": text} for pk, text in latest.items() if text is not None]
        if written:
            sql.run_many(conn, sql.index_document, written)
        documents.clear()
    rows = conn.info.get(PENDING_CHANGES)
    if not rows:
        return
    if sql.feed_lock is not None:
        sql.run(conn, sql.feed_lock, {})
    sql.run_many(conn, sql.record, rows)
    rows.clear()
