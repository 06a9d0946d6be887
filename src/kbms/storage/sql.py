"""The SQL that every engine runs, on an open connection inside a transaction the backend owns.

The write path for one delivery, in one transaction:

1. *claim* the ledger row ``(provider, delivery_key)``: an insert that does nothing on conflict (a redelivery),
   unless the earlier attempt was rejected, in which case it is claimed again;
2. *insert* the conversation with ``ON CONFLICT DO NOTHING``: a new conversation costs one insert per table;
3. otherwise *lock and merge*: load the stored state (``SELECT ... FOR UPDATE`` where the engine has it; SQLite
   has one writer at a time), merge in Python (``kbms.merge``) and write only what changed;
4. record the outcome on the ledger row.

Two deliveries racing to create one conversation meet at the unique key in step 2: the loser's insert does
nothing (on PostgreSQL it waits for the winner to commit) and it merges instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import (
    Connection,
    RowMapping,
    Select,
    Table,
    and_,
    bindparam,
    column,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import delete as delete_
from sqlalchemy import table as table_
from sqlalchemy.engine import Dialect

from kbms import search
from kbms.errors import FieldIssue, describe
from kbms.merge import (
    ConversationState,
    conversation_id,
    delete,
    merge,
    new_state,
    render,
    replay,
    tombstone,
)
from kbms.model import (
    Change,
    Conversation,
    ConversationDeletion,
    ConversationSnapshot,
    ConversationSummary,
    Message,
    Redactor,
    from_micros,
    micros,
)
from kbms.storage.base import (
    Applied,
    ChangeRecord,
    ConcurrentCreation,
    ConversationKey,
    Cursor,
    Delivery,
    Filters,
    Hit,
    KnownDelivery,
    LedgerEntry,
    Page,
    Reader,
    Rebuilt,
)
from kbms.storage.rows import (
    conversation_values,
    decode_registers,
    event_from_row,
    event_values,
    message_from_row,
    message_values,
    participant_from_row,
    participant_values,
)
from kbms.storage.schema import (
    changes,
    conversation_tags,
    conversations,
    events,
    ledger,
    messages,
    participants,
    redactions,
)

# sqlalchemy.dialects.sqlite.insert or sqlalchemy.dialects.postgresql.insert: same upsert API, two dialects.
InsertFactory = Callable[[Table], Any]

CHILD_TABLES: tuple[tuple[Table, tuple[str, ...]], ...] = (
    (participants, ("conversation_pk", "participant_id")),
    (messages, ("conversation_pk", "message_id")),
    (events, ("conversation_pk", "event_id")),
)
# Keys per IN (...) list: well under SQLite's 32,766 variables and PostgreSQL's 65,535 parameters.
KEYS_PER_QUERY = 1000
# What a delivery that was rejected before takes over when it is claimed again.
LEDGER_RECLAIMED = (
    "workspace",
    "named_workspace",
    "kind",
    "verified",
    "topic",
    "body_hash",
    "received_at",
    "outcome",
    "error",
    "body",
)
SUMMARY_COLUMNS = (
    conversations.c.id,
    conversations.c.provider,
    conversations.c.external_id,
    conversations.c.workspace,
    conversations.c.created_at,
    conversations.c.updated_at,
    conversations.c.participant_count,
    conversations.c.message_count,
    conversations.c.last_message_at,
    conversations.c.last_message_preview,
    conversations.c.subject,
    conversations.c.state,
)


@dataclass(frozen=True, slots=True)
class _Compiled:
    text: str
    positions: tuple[str, ...] | None  # bind names in order, for positional drivers (sqlite3); None: named
    fixed: dict[str, Any]  # binds SQLAlchemy made of literals in the statement (``outcome = 'rejected'``)

    def arguments(self, params: Mapping[str, Any]) -> Any:
        if self.positions is None:
            return {**self.fixed, **params} if self.fixed else params
        fixed = self.fixed
        return [params[name] if name in params else fixed[name] for name in self.positions]


class Sql:
    """Every statement kbms runs, built once per dialect and executed with parameters.

    Why prebuilt: building a statement per call (``insert(...).values(**row)``, ``.excluded``) made SQLAlchemy
    rebuild and re-hash it every time: 4.2 ms per delivery before any I/O (measured with cProfile).

    Why ``run``: on the hot paths (ingest, duplicate checks, detail reads) even a prebuilt statement cost about
    27 us per execution in SQLAlchemy's execution layer, against 1.5 us for the driver itself. So hot statements
    are compiled once per dialect and parameter set (by SQLAlchemy: it stays the one definition of every
    statement) and executed on the driver connection, inside the same transaction.
    """

    def __init__(self, insert: InsertFactory, dialect: Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[tuple[int, tuple[str, ...]], _Compiled] = {}
        c = conversations.c
        by_key = and_(
            c.provider == bindparam("k_provider"),
            c.workspace == bindparam("k_workspace"),
            c.external_id == bindparam("k_external_id"),
        )
        claim = insert(ledger)
        self.claim = claim.on_conflict_do_update(
            index_elements=["provider", "delivery_key"],
            set_={name: claim.excluded[name] for name in LEDGER_RECLAIMED},
            where=ledger.c.outcome == "rejected",
        ).returning(ledger.c.pk)
        # Updates executed with a parameter dict SET exactly the columns named in it.
        self.settle = update(ledger).where(ledger.c.pk == bindparam("b_pk"))
        self.save = update(conversations).where(c.pk == bindparam("b_pk"))
        self.conversation_id = select(c.id).where(by_key)
        # No conflict target: the id is derived from (provider, workspace, external_id), so two creators of one
        # conversation collide on both unique indexes, and either collision means "it exists: merge instead".
        self.create = insert(conversations).on_conflict_do_nothing().returning(c.pk)
        self.lock = select(conversations).where(by_key).with_for_update()
        self.children: dict[Table, tuple[Select[Any], Any, Any]] = {}
        for table, keys in CHILD_TABLES:
            upsert = insert(table)
            upsert = upsert.on_conflict_do_update(
                index_elements=list(keys),
                set_={col.name: upsert.excluded[col.name] for col in table.columns if col.name not in keys},
            )
            load = select(table).where(table.c.conversation_pk == bindparam("b_pk"))
            self.children[table] = (load, insert(table), upsert)
        self.purge = {
            load: delete_(table).where(table.c.conversation_pk == bindparam("b_pk"))
            for table, (load, _i, _u) in self.children.items()
        }
        self.rewrite_body = update(ledger).where(ledger.c.pk == bindparam("b_pk"))
        # A conversation's own payloads, and the rejected ones of its workspace (the redactor checks the id).
        self.redactable_bodies = select(ledger.c.pk, ledger.c.body).where(
            or_(
                ledger.c.conversation_pk == bindparam("b_pk"),
                and_(
                    ledger.c.outcome == "rejected",
                    ledger.c.provider == bindparam("b_provider"),
                    ledger.c.workspace == bindparam("b_workspace"),
                ),
            )
        )
        r = redactions.c
        self.record_redaction = insert(redactions).on_conflict_do_nothing()
        self.redactions_of = select(r.message_id, r.message).where(
            r.provider == bindparam("k_provider"),
            r.workspace == bindparam("k_workspace"),
            r.external_id == bindparam("k_external_id"),
        )
        self.find_delivery = (
            select(ledger.c.outcome, c.id, c.external_id, c.workspace)
            .select_from(ledger.outerjoin(conversations, c.pk == ledger.c.conversation_pk))
            .where(ledger.c.provider == bindparam("b_provider"), ledger.c.delivery_key == bindparam("b_key"))
        )
        self.find_deliveries = (
            select(ledger.c.delivery_key, ledger.c.outcome, c.id, c.external_id, c.workspace)
            .select_from(ledger.outerjoin(conversations, c.pk == ledger.c.conversation_pk))
            .where(
                ledger.c.provider == bindparam("b_provider"),
                ledger.c.delivery_key.in_(bindparam("b_keys", expanding=True)),
            )
        )
        self.detail = select(c.detail, c.workspace).where(c.id == bindparam("b_id"), c.deleted_at.is_(None))
        self.tag = insert(conversation_tags)
        self.untag = delete_(conversation_tags).where(conversation_tags.c.conversation_pk == bindparam("b_pk"))
        self.record = insert(changes)
        self.feed = (
            select(changes)
            .where(changes.c.seq > bindparam("b_after"))
            .order_by(changes.c.seq)
            .limit(bindparam("b_limit"))
        )
        self.feed_within = self.feed.where(changes.c.workspace.in_(bindparam("b_within", expanding=True)))
        # Where search documents are written (see ``_write_index``): at the end of the transaction on SQLite,
        # inside each write's savepoint on PostgreSQL.
        self.defer_documents = dialect.name == "sqlite"
        if dialect.name == "sqlite":
            self.index_document = text("INSERT INTO search_index (rowid, document) VALUES (:b_pk, :b_document)")
            self.unindex = text("DELETE FROM search_index WHERE rowid = :b_pk")
        else:
            self.index_document = text(
                "INSERT INTO search_documents (conversation_pk, tsv) VALUES (:b_pk, to_tsvector('simple', :b_document))"
                " ON CONFLICT (conversation_pk) DO UPDATE SET tsv = EXCLUDED.tsv"
            )
            self.unindex = text("DELETE FROM search_documents WHERE conversation_pk = :b_pk")
        self._statements: dict[tuple[object, ...], Any] = {}

    def page(self, after: bool, filters: Filters, *, export: bool = False) -> Any:
        """The list (or export) statement for this combination of filters, built once per combination."""
        shape = ("export" if export else "page", after, *_shape(filters))
        cached = self._statements.get(shape)
        if cached is not None:
            return cached
        c = conversations.c
        columns = (c.detail, c.updated_at, c.id) if export else SUMMARY_COLUMNS
        statement: Any = select(*columns).where(c.deleted_at.is_(None), *_conditions(filters))
        if after:
            statement = statement.where(
                or_(
                    c.updated_at < bindparam("b_updated_at"),
                    and_(c.updated_at == bindparam("b_updated_at"), c.id < bindparam("b_id")),
                )
            )
        statement = statement.order_by(c.updated_at.desc(), c.id.desc()).limit(bindparam("b_limit"))
        self._statements[shape] = statement
        return statement

    def search(self, filters: Filters) -> Any:
        """Full-text search with these filters: each engine's index and relevance, the same words (kbms.search).

        Relevance is computed over a window: the ``b_window`` most recently created matching conversations (those
        with the highest keys), then ranked. Ranking every match costs time in proportion to the matches (a common
        word matches most of a million conversations: seconds); finding the newest matches in key order stops
        after the window, so a search costs about the same at any corpus size. When fewer match, all are ranked.
        """
        shape = ("search", *_shape(filters))
        cached = self._statements.get(shape)
        if cached is not None:
            return cached
        c = conversations.c
        conditions = _conditions(filters)
        if self._dialect.name == "sqlite":
            index = table_("search_index", column("rowid"))
            # bm25 is lower for better matches: negated, higher is better on both engines. The filters join in
            # the window's query, so that a filtered search ranks the newest matches that pass the filters.
            window = select(index.c.rowid.label("pk"), (-func.bm25(literal_column("search_index"))).label("score"))
            window = window.where(literal_column("search_index").op("MATCH")(bindparam("b_query")))
            if conditions:
                window = window.join(conversations, c.pk == index.c.rowid).where(*conditions)
            ranked = window.order_by(index.c.rowid.desc()).limit(bindparam("b_window")).subquery("ranked")
            score = ranked.c.score
        else:
            documents = table_("search_documents", column("conversation_pk"), column("tsv"))
            query = func.to_tsquery("simple", bindparam("b_query"))
            # The newest matches first (ts_rank reads each whole tsvector: only for the window's rows).
            newest = select(documents.c.conversation_pk.label("pk")).where(documents.c.tsv.op("@@")(query))
            if conditions:
                newest = newest.join(conversations, c.pk == documents.c.conversation_pk).where(*conditions)
            newest_rows = newest.order_by(documents.c.conversation_pk.desc()).limit(bindparam("b_window"))
            chosen = newest_rows.subquery("newest")
            ranked = (
                select(chosen.c.pk, func.ts_rank(documents.c.tsv, query).label("score"))
                .select_from(chosen.join(documents, documents.c.conversation_pk == chosen.c.pk))
                .subquery("ranked")
            )
            score = ranked.c.score
        statement = (
            select(*SUMMARY_COLUMNS, c.detail, score)
            .select_from(ranked.join(conversations, c.pk == ranked.c.pk))
            .where(c.deleted_at.is_(None))
            .order_by(score.desc(), c.pk.desc())
            .limit(bindparam("b_limit"))
            .offset(bindparam("b_offset"))
        )
        self._statements[shape] = statement
        return statement

    def _compile(self, statement: Any, keys: tuple[str, ...]) -> _Compiled:
        cached = self._compiled.get((id(statement), keys))
        if cached is None:
            columns = [key for key in keys if not key.startswith(("b_", "k_"))]
            compiled = statement.compile(dialect=self._dialect, column_keys=columns)
            positions = tuple(compiled.positiontup) if compiled.positiontup is not None else None
            fixed = {name: bind.effective_value for name, bind in compiled.binds.items() if name not in keys}
            cached = self._compiled[(id(statement), keys)] = _Compiled(str(compiled), positions, fixed)
        return cached

    def run(self, conn: Connection, statement: Any, params: Mapping[str, Any]) -> Any:
        """Execute a prebuilt statement on the driver; the driver's cursor (rows as tuples)."""
        compiled = self._compile(statement, tuple(params))
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(compiled.text, compiled.arguments(params))
        return cursor

    def run_many(self, conn: Connection, statement: Any, rows: list[dict[str, Any]]) -> None:
        compiled = self._compile(statement, tuple(rows[0]))
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.executemany(compiled.text, [compiled.arguments(row) for row in rows])


@dataclass(frozen=True, slots=True)
class Creation:
    """A snapshot's conversation as it is stored if it is new, with every row already built.

    Built before the write starts (``prepare``): rendering the detail and building rows is most of a write's CPU
    time, and on SQLite everything inside a write holds the one write lock that every process waits for.
    """

    state: ConversationState
    row: dict[str, Any]  # the conversations row, but changed_at
    children: tuple[list[dict[str, Any]], ...]  # participants, messages, events rows, but conversation_pk
    index: Index


@dataclass(frozen=True, slots=True)
class Index:
    """What a live conversation adds to the list's tag filter and to full-text search."""

    tags: list[str]
    document: str

    @classmethod
    def of(cls, detail: Conversation) -> Index:
        return cls(list(dict.fromkeys(detail.tags)), search.document(detail))


def prepare(snapshot: ConversationSnapshot) -> Creation:
    state = new_state(conversation_id(snapshot.provider, snapshot.workspace, snapshot.external_id), snapshot)
    detail = render(state)
    row = conversation_values(state, changed_at=0, detail=detail)
    children = (
        [participant_values(0, p) for p in state.participants.values()],
        [message_values(0, m, state.message_versions[i]) for i, m in state.messages.items()],
        [event_values(0, e) for e in state.events.values()],
    )
    return Creation(state, row, children, Index.of(detail))


def _key_params(change: Change) -> dict[str, str]:
    return {
        "k_provider": change.provider,
        "k_workspace": change.workspace,
        "k_external_id": change.external_id,
    }


def _ledger_values(delivery: Delivery, *, outcome: str, error: str | None) -> dict[str, Any]:
    return {
        "provider": delivery.provider,
        "workspace": delivery.workspace,
        "named_workspace": delivery.named_workspace,
        "kind": delivery.kind,
        "verified": delivery.verified,
        "topic": delivery.topic,
        "delivery_key": delivery.delivery_key,
        "body_hash": delivery.body_hash,
        "received_at": micros(delivery.received_at),
        "outcome": outcome,
        "error": error,
        "conversation_pk": None,
        "body": delivery.body,
    }


def _record(sql: Sql, conn: Connection, delivery: Delivery, *, outcome: str, error: str | None) -> int | None:
    """Insert the ledger row, or take over a previously rejected one; None when the delivery is a repeat."""
    row = sql.run(conn, sql.claim, _ledger_values(delivery, outcome=outcome, error=error)).fetchone()
    return None if row is None else int(row[0])


def apply_delivery(
    sql: Sql,
    conn: Connection,
    delivery: Delivery,
    change: Change | None,
    *,
    now: int,
    redact: Redactor | None = None,
    creation: Creation | None = None,
) -> Applied:
    """Record one delivery and apply its change. ``creation``: ``prepare(change)``, if the caller built it."""
    claim = _record(sql, conn, delivery, outcome="pending", error=None)
    if change is None:
        if claim is not None:
            sql.run(conn, sql.settle, {"outcome": "ignored", "conversation_pk": None, "b_pk": claim})
        return Applied("ignored", None, None, duplicate_delivery=claim is None)
    key = _key_params(change)
    if claim is None:
        existing = sql.run(conn, sql.conversation_id, key).fetchone()
        if existing is not None:
            return Applied("unchanged", str(existing[0]), change.external_id, duplicate_delivery=True)
    if isinstance(change, ConversationDeletion):
        applied, conversation_pk = _store_deletion(sql, conn, change, key, at=micros(delivery.received_at), now=now)
    else:
        applied, conversation_pk = _store_snapshot(sql, conn, change, key, now=now, creation=creation)
        if redact is not None:
            created = applied.result == "created"
            _apply_redactions(sql, conn, change, key, conversation_pk, created, claim, delivery.body, redact)
    if claim is not None:
        sql.run(conn, sql.settle, {"outcome": applied.result, "conversation_pk": conversation_pk, "b_pk": claim})
    return Applied(applied.result, applied.conversation_id, applied.external_id)


def record_rejection(sql: Sql, conn: Connection, delivery: Delivery, issues: list[FieldIssue]) -> None:
    _record(sql, conn, delivery, outcome="rejected", error=describe(issues))


def _store_snapshot(
    sql: Sql,
    conn: Connection,
    snapshot: ConversationSnapshot,
    key: dict[str, str],
    *,
    now: int,
    creation: Creation | None,
) -> tuple[Applied, int]:
    new = creation or prepare(snapshot)
    row = sql.run(conn, sql.create, {**new.row, "changed_at": now}).fetchone()
    if row is not None:
        pk = int(row[0])
        for (table, _keys), rows in zip(CHILD_TABLES, new.children, strict=True):
            if rows:
                for child in rows:
                    child["conversation_pk"] = pk  # the rows are this write's own (a retry sets them again)
                # A fresh conversation has no children yet: a plain insert is enough (and cheaper).
                sql.run_many(conn, sql.children[table][1], rows)
        _write_index(sql, conn, pk, new.index, fresh=True)
        record_change(conn, new.state, "created", now)
        return Applied("created", new.state.id, new.state.external_id), pk

    pk, stored = load_state(sql, conn, key)
    result = merge(stored, snapshot)
    if not result.changed:
        return Applied("unchanged", stored.id, stored.external_id), pk
    merged = result.state
    _write_children(sql, conn, pk, merged, result.participants, result.rewritten_messages, result.events, fresh=False)
    detail = render(merged)
    sql.run(conn, sql.save, {**conversation_values(merged, changed_at=now, detail=detail), "b_pk": pk})
    if stored.deleted_at is None:  # a tombstone stays out of the index (its merge changes nothing anyway)
        _write_index(sql, conn, pk, Index.of(detail), fresh=False)
        record_change(conn, merged, "updated", now)
    return Applied("updated", merged.id, merged.external_id), pk


def _store_deletion(
    sql: Sql, conn: Connection, deletion: ConversationDeletion, key: dict[str, str], *, at: int, now: int
) -> tuple[Applied, int]:
    conversation = conversation_id(deletion.provider, deletion.workspace, deletion.external_id)
    grave = tombstone(conversation, deletion.provider, deletion.workspace, deletion.external_id, at=at)
    row = conn.execute(sql.create, conversation_values(grave, changed_at=now)).first()
    if row is not None:  # deleted before anything else arrived: the tombstone keeps it from ever appearing
        return Applied("created", conversation, deletion.external_id), int(row[0])
    pk, stored = load_state(sql, conn, key)
    deleted = delete(stored, at=at)
    if deleted is stored:
        return Applied("unchanged", stored.id, stored.external_id), pk
    for load, _insert, _upsert in sql.children.values():
        conn.execute(sql.purge[load], {"b_pk": pk})
    conn.execute(sql.save, {**conversation_values(deleted, changed_at=now), "b_pk": pk})
    _write_index(sql, conn, pk, None, fresh=False)
    record_change(conn, deleted, "deleted", now)
    return Applied("updated", stored.id, stored.external_id), pk


def _apply_redactions(
    sql: Sql,
    conn: Connection,
    snapshot: ConversationSnapshot,
    key: dict[str, str],
    conversation_pk: int,
    created: bool,
    claim: int | None,
    body: bytes,
    redact: Redactor,
) -> None:
    """Keep no raw copy of redacted text, whatever the order deliveries come in.

    Redacted messages are recorded by the conversation's provider key (a deletion does not purge them). A new one
    rewrites every payload stored for the conversation, and rejected payloads of its workspace; a delivery for a
    conversation that has redactions is rewritten before it is kept (it may be an older copy).
    """
    incoming = [m for m in snapshot.messages if m.redacted]
    recorded = 0
    for message in incoming:
        row = {
            "provider": snapshot.provider,
            "workspace": snapshot.workspace,
            "external_id": snapshot.external_id,
            "message_id": message.id,
            "message": message.model_dump_json(),
        }
        recorded += sql.run(conn, sql.record_redaction, row).rowcount
    if created and not recorded:
        return  # a new conversation: no redaction can be waiting for it
    redacted = {
        message_id: Message.model_validate_json(text)
        for message_id, text in sql.run(conn, sql.redactions_of, key).fetchall()
    }
    if not redacted:
        return
    external_id = snapshot.external_id
    if claim is not None and (clean := redact(body, external_id, redacted)) is not None:
        sql.run(conn, sql.rewrite_body, {"body": clean, "b_pk": claim})
    if recorded:
        params = {"b_pk": conversation_pk, "b_provider": snapshot.provider, "b_workspace": snapshot.workspace}
        for pk, stored in _stream(sql.run(conn, sql.redactable_bodies, params)):
            if pk != claim and (clean := redact(stored, external_id, redacted)) is not None:
                sql.run(conn, sql.rewrite_body, {"body": clean, "b_pk": pk})


def _stream(cursor: Any, size: int = 50) -> Iterator[tuple[int, bytes]]:
    """Rows a few at a time: a conversation's payloads can add up to far more than memory should hold."""
    while rows := cursor.fetchmany(size):
        for pk, body in rows:
            yield pk, bytes(body)


def _write_index(sql: Sql, conn: Connection, pk: int, index: Index | None, *, fresh: bool) -> None:
    """Replace a conversation's tags and search document (``index`` None: remove them, it is deleted).

    ``fresh``: the conversation has no tags or document yet. On SQLite the document itself is written at the end of
    the transaction (see ``flush_changes``). On PostgreSQL it is written here, inside the write's savepoint:
    PostgreSQL refuses a tsvector over 1 MB, and that refusal must fail this write alone, not its whole batch.
    """
    if not fresh:
        sql.run(conn, sql.untag, {"b_pk": pk})
    if index is not None and index.tags:
        sql.run_many(conn, sql.tag, [{"conversation_pk": pk, "tag": tag} for tag in index.tags])
    if sql.defer_documents:
        conn.info.setdefault(PENDING_DOCUMENTS, []).append((pk, None if index is None else index.document, fresh))
        return
    if not fresh:
        sql.run(conn, sql.unindex, {"b_pk": pk})
    if index is not None:
        sql.run(conn, sql.index_document, {"b_pk": pk, "b_document": index.document})


# The change feed and the search documents. A write records them on its connection as it goes; the store writes
# them at the end of the transaction, with ``flush_changes``, and drops those of a write rolled back to its
# savepoint (``discard_changes``).
# - The feed, at the end: on PostgreSQL the rows are numbered under a lock held until the commit, so the numbering
#   is the commit order (see ``flush_changes``); taking that lock last means a transaction holding it never waits
#   for anything else, and cannot deadlock with one that holds a row it needs.
# - SQLite's search documents, at the end and outside every savepoint: FTS5 writes out its pending index data at each
#   savepoint, and a statement that needs a statement journal opens one. Inline, every write of a batch flushed
#   its own small index segment (and the ledger's settling UPDATE, checked against its foreign key, paid about
#   65 us for it, profiled); at the end, the batch's documents go into one segment.
PENDING_CHANGES = "kbms.pending_changes"
PENDING_DOCUMENTS = "kbms.pending_documents"
# The PostgreSQL advisory lock that orders the feed ("feed" in ASCII).
FEED_LOCK = 0x66656564
Mark = tuple[int, int]


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


def pending_changes(conn: Connection) -> Mark:
    """How much this transaction has recorded so far (a mark for ``discard_changes``)."""
    return len(conn.info.get(PENDING_CHANGES, ())), len(conn.info.get(PENDING_DOCUMENTS, ()))


def discard_changes(conn: Connection, mark: Mark = (0, 0)) -> None:
    """Forget what was recorded after ``mark`` (its write was rolled back)."""
    del conn.info.setdefault(PENDING_CHANGES, [])[mark[0] :]
    del conn.info.setdefault(PENDING_DOCUMENTS, [])[mark[1] :]


def flush_changes(sql: Sql, conn: Connection) -> None:
    """Write the recorded search documents and changes; the last statements of a write transaction.

    On PostgreSQL, sequence values are handed out in one order and transactions commit in another, so a reader
    following ``seq`` could pass a number whose transaction commits later, and miss it for good. Here every writer
    takes one transaction-scoped advisory lock before it draws its numbers, and keeps it until its commit: the
    next writer draws only after the previous one has committed (PostgreSQL makes a commit visible before it
    releases the transaction's locks), so numbers become visible in increasing order and a reader that has seen
    ``seq`` n will never later see a smaller one. SQLite has one writer at a time already.
    """
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
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({FEED_LOCK})")
    sql.run_many(conn, sql.record, rows)
    rows.clear()


def _write_children(
    sql: Sql,
    conn: Connection,
    pk: int,
    state: ConversationState,
    participant_ids: Iterable[str],
    message_ids: Iterable[str],
    event_ids: Iterable[str],
    *,
    fresh: bool,
) -> None:
    rows = (
        [participant_values(pk, state.participants[i]) for i in participant_ids],
        [message_values(pk, state.messages[i], state.message_versions[i]) for i in message_ids],
        [event_values(pk, state.events[i]) for i in event_ids],
    )
    for (table, _keys), values in zip(CHILD_TABLES, rows, strict=True):
        if values:
            _load, insert, upsert = sql.children[table]
            # A fresh conversation has no children yet: a plain insert is enough (and cheaper).
            sql.run_many(conn, insert if fresh else upsert, values)


def load_state(sql: Sql, conn: Connection, key: dict[str, str]) -> tuple[int, ConversationState]:
    """The stored merge state of one conversation (which must exist), row-locked where the engine can."""
    row = conn.execute(sql.lock, key).mappings().one()
    pk = int(row["pk"])
    message_rows = list(_children(sql, conn, messages, pk))
    state = ConversationState(
        deleted_at=row["deleted_at"],
        id=row["id"],
        provider=row["provider"],
        workspace=row["workspace"],
        external_id=row["external_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        revision=row["revision"],
        header=decode_registers(row["header"]),
        participants={p.id: p for p in map(participant_from_row, _children(sql, conn, participants, pk))},
        messages={m.id: m for m in map(message_from_row, message_rows)},
        message_versions={row["message_id"]: row["version"] for row in message_rows},
        events={e.id: e for e in map(event_from_row, _children(sql, conn, events, pk))},
    )
    return pk, state


def _children(sql: Sql, conn: Connection, table: Table, pk: int) -> Iterable[RowMapping]:
    return conn.execute(sql.children[table][0], {"b_pk": pk}).mappings()


def find_delivery(sql: Sql, conn: Connection, provider: str, delivery_key: str) -> KnownDelivery | None:
    row = sql.run(conn, sql.find_delivery, {"b_provider": provider, "b_key": delivery_key}).fetchone()
    if row is None:
        return None
    return KnownDelivery(outcome=row[0], conversation_id=row[1], external_id=row[2], workspace=row[3])


def find_deliveries(sql: Sql, conn: Connection, provider: str, keys: Sequence[str]) -> dict[str, KnownDelivery]:
    found: dict[str, KnownDelivery] = {}
    for start in range(0, len(keys), KEYS_PER_QUERY):
        params = {"b_provider": provider, "b_keys": list(keys[start : start + KEYS_PER_QUERY])}
        for key, outcome, conversation, external_id, workspace in conn.execute(sql.find_deliveries, params):
            found[key] = KnownDelivery(outcome, conversation, external_id, workspace)
    return found


def get_detail_json(
    sql: Sql, conn: Connection, conversation_id: str, within: frozenset[str] | None = None
) -> str | None:
    row = sql.run(conn, sql.detail, {"b_id": conversation_id}).fetchone()
    if row is None or (within is not None and row[1] not in within):
        return None
    return str(row[0])


def get_detail(sql: Sql, conn: Connection, conversation_id: str) -> Conversation | None:
    text = get_detail_json(sql, conn, conversation_id)
    return None if text is None else Conversation.model_validate_json(text)


FILTERS = ("provider", "workspace", "state", "tag", "updated_after", "updated_before", "within")


def _shape(filters: Filters) -> tuple[bool, ...]:
    return tuple(getattr(filters, name) is not None for name in FILTERS)


def _conditions(filters: Filters) -> list[Any]:
    """The WHERE conditions of the filters that are set, each with a ``b_<filter>`` parameter."""
    c = conversations.c
    conditions: list[Any] = []
    for name in ("provider", "workspace", "state"):
        if getattr(filters, name) is not None:
            conditions.append(c[name] == bindparam(f"b_{name}"))
    if filters.tag is not None:
        tagged = select(conversation_tags.c.conversation_pk).where(
            conversation_tags.c.conversation_pk == c.pk, conversation_tags.c.tag == bindparam("b_tag")
        )
        conditions.append(tagged.exists())
    if filters.updated_after is not None:
        conditions.append(c.updated_at > bindparam("b_updated_after"))
    if filters.updated_before is not None:
        conditions.append(c.updated_at < bindparam("b_updated_before"))
    if filters.within is not None:
        conditions.append(c.workspace.in_(bindparam("b_within", expanding=True)))
    return conditions


def _filter_params(filters: Filters) -> dict[str, Any]:
    params = {f"b_{name}": getattr(filters, name) for name in FILTERS if getattr(filters, name) is not None}
    if filters.within is not None:
        params["b_within"] = sorted(filters.within)
    return params


def list_page(sql: Sql, conn: Connection, *, limit: int, cursor: Cursor | None, filters: Filters) -> Page:
    params: dict[str, Any] = {"b_limit": limit + 1, **_filter_params(filters)}
    if cursor is not None:
        params.update(b_updated_at=cursor.updated_at, b_id=cursor.conversation_id)
    rows = conn.execute(sql.page(cursor is not None, filters), params).mappings().all()
    items = [_summary(row) for row in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    next_cursor = Cursor(updated_at=last["updated_at"], conversation_id=last["id"]) if last is not None else None
    return Page(items=items, next_cursor=next_cursor)


def _summary(row: RowMapping) -> ConversationSummary:
    last_at = row["last_message_at"]
    return ConversationSummary(
        id=row["id"],
        provider=row["provider"],
        external_id=row["external_id"],
        workspace=row["workspace"],
        created_at=from_micros(row["created_at"]),
        updated_at=from_micros(row["updated_at"]),
        participant_count=row["participant_count"],
        message_count=row["message_count"],
        last_message_at=from_micros(last_at) if last_at is not None else None,
        last_message_preview=row["last_message_preview"],
        subject=row["subject"],
        state=row["state"],
    )


def search_page(
    sql: Sql, conn: Connection, *, terms: Sequence[str], filters: Filters, limit: int, offset: int
) -> list[Hit]:
    query = search.fts5_query(terms) if conn.dialect.name == "sqlite" else search.tsquery(terms)
    params = {"b_query": query, "b_limit": limit, "b_offset": offset, "b_window": search.WINDOW}
    params.update(_filter_params(filters))
    hits = []
    for row in conn.execute(sql.search(filters), params).mappings():
        detail = json.loads(row["detail"])
        found = search.snippet(
            detail.get("subject"), ((m["id"], m["content"]) for m in detail.get("messages", ())), terms
        )
        hits.append(
            Hit(
                summary=_summary(row),
                score=float(row["score"]),
                snippet=found.text if found is not None else None,
                message_id=found.message_id if found is not None else None,
            )
        )
    return hits


def changes_after(
    sql: Sql, conn: Connection, *, after: int, limit: int, within: frozenset[str] | None = None
) -> list[ChangeRecord]:
    if within is None:
        rows = conn.execute(sql.feed, {"b_after": after, "b_limit": limit}).mappings()
    else:
        params = {"b_after": after, "b_limit": limit, "b_within": sorted(within)}
        rows = conn.execute(sql.feed_within, params).mappings()
    return [ChangeRecord(**row) for row in rows]


def count(sql: Sql, conn: Connection, *, filters: Filters) -> int:
    c = conversations.c
    statement = select(func.count()).where(c.deleted_at.is_(None), *_conditions(filters))
    return int(conn.execute(statement, _filter_params(filters)).scalar_one())


def export_chunk(
    sql: Sql, conn: Connection, *, filters: Filters, cursor: Cursor | None, size: int
) -> tuple[list[bytes], Cursor | None]:
    """Up to ``size`` details after ``cursor`` (in the list's order), and the cursor after them (None at the end)."""
    params: dict[str, Any] = {"b_limit": size, **_filter_params(filters)}
    if cursor is not None:
        params.update(b_updated_at=cursor.updated_at, b_id=cursor.conversation_id)
    rows = conn.execute(sql.page(cursor is not None, filters, export=True), params).all()
    if not rows:
        return [], None
    last = rows[-1]
    following = Cursor(updated_at=last[1], conversation_id=last[2]) if len(rows) == size else None
    return [row[0].encode() for row in rows], following


# Re-deriving conversations from the ledger (``kbms reprocess``). Not a hot path: statements are built per call.

LEDGER_ENTRY_COLUMNS = (
    ledger.c.pk,
    ledger.c.provider,
    ledger.c.kind,
    ledger.c.workspace,
    ledger.c.topic,
    ledger.c.body,
    ledger.c.received_at,
    ledger.c.outcome,
    ledger.c.error,
    ledger.c.conversation_pk,
    ledger.c.named_workspace,
)


def _entry(row: Any) -> LedgerEntry:
    return LedgerEntry(*row)


def unlinked_deliveries(
    conn: Connection, *, provider: str | None, since: int | None, after: tuple[int, int] | None, limit: int
) -> list[LedgerEntry]:
    query = select(*LEDGER_ENTRY_COLUMNS).where(ledger.c.conversation_pk.is_(None))
    if provider is not None:
        query = query.where(ledger.c.provider == provider)
    if since is not None:
        query = query.where(ledger.c.received_at >= since)
    if after is not None:
        query = query.where(
            or_(ledger.c.received_at > after[0], and_(ledger.c.received_at == after[0], ledger.c.pk > after[1]))
        )
    rows = conn.execute(query.order_by(ledger.c.received_at, ledger.c.pk).limit(limit)).all()
    return [_entry(row) for row in rows]


def conversations_in_scope(
    conn: Connection, *, provider: str | None, since: int | None, conversation_id: str | None
) -> list[ConversationKey]:
    c = conversations.c
    query = (
        select(c.provider, c.workspace, c.external_id)
        .select_from(conversations.join(ledger, ledger.c.conversation_pk == c.pk))
        .group_by(c.provider, c.workspace, c.external_id)
        .order_by(func.min(ledger.c.received_at), c.provider, c.workspace, c.external_id)
    )
    if provider is not None:
        query = query.where(ledger.c.provider == provider)
    if since is not None:
        query = query.where(ledger.c.received_at >= since)
    if conversation_id is not None:
        query = query.where(c.id == conversation_id)
    return [ConversationKey(*row) for row in conn.execute(query).all()]


def _key_of(change: Change) -> ConversationKey:
    return ConversationKey(change.provider, change.workspace, change.external_id)


def reclassify(conn: Connection, ledger_pk: int, outcome: str, error: str | None) -> None:
    conn.execute(update(ledger).where(ledger.c.pk == ledger_pk).values(outcome=outcome, error=error))


ACCEPTED = frozenset(("created", "updated", "unchanged"))


def rebuild(
    sql: Sql,
    conn: Connection,
    key: ConversationKey,
    extra: list[int],
    read: Reader,
    redact: Redactor | None,
    *,
    now: int,
) -> Rebuilt:
    """Fold every delivery of one conversation, in received order, through today's mappers; store the result
    if it differs from what is stored, and correct each delivery's standing. Doing it twice changes nothing.

    Deliveries that now belong to another conversation are handed back (``Rebuilt.moved``); a conversation that no
    delivery produces any more becomes a tombstone.
    """
    params = {"k_provider": key.provider, "k_workspace": key.workspace, "k_external_id": key.external_id}
    exists = conn.execute(sql.lock, params).first() is not None
    stored_pk, stored = load_state(sql, conn, params) if exists else (None, None)
    filters = [ledger.c.conversation_pk == stored_pk] if stored_pk is not None else []
    filters += [ledger.c.pk.in_(extra)] if extra else []
    query = select(*LEDGER_ENTRY_COLUMNS).where(or_(*filters)).order_by(ledger.c.received_at, ledger.c.pk)
    entries = [_entry(row) for row in conn.execute(query)] if filters else []

    readings = [(entry, read(entry)) for entry in entries]
    mine = [(e, r.change) for e, r in readings if r.change is not None and _key_of(r.change) == key]
    moved: dict[ConversationKey, list[int]] = {}
    for entry, reading in readings:
        if reading.change is not None and _key_of(reading.change) != key:
            moved.setdefault(_key_of(reading.change), []).append(entry.pk)
    cid = conversation_id(key.provider, key.workspace, key.external_id)
    state, results = replay(cid, ((c, e.received_at) for e, c in mine))
    if state is None and stored is not None:
        state = delete(stored, at=now)  # nothing produces it any more
    outcomes: dict[int, tuple[str, str | None, bool]] = {
        entry.pk: ("rejected" if reading.error else "ignored", reading.error, False)
        for entry, reading in readings
        if entry.pk not in {pk for pks in moved.values() for pk in pks}
    }
    outcomes.update({entry.pk: (outcome, None, True) for (entry, _), outcome in zip(mine, results, strict=True)})

    changed = False
    if state is not None and (stored is None or not state.same_content(stored)):
        changed = True
        revised = replace(state, revision=stored.revision + 1 if stored is not None else 1)
        detail = render(revised)
        values = conversation_values(revised, changed_at=now, detail=detail)
        if stored_pk is None:
            created = conn.execute(sql.create, values).first()
            if created is None:
                raise ConcurrentCreation(key)
            stored_pk = int(created[0])
        else:
            for load, _insert, _upsert in sql.children.values():
                conn.execute(sql.purge[load], {"b_pk": stored_pk})
            conn.execute(sql.save, {**values, "b_pk": stored_pk})
        _write_children(
            sql, conn, stored_pk, revised, revised.participants, revised.messages, revised.events, fresh=True
        )
        was_live = stored is not None and stored.deleted_at is None
        live = revised.deleted_at is None
        _write_index(sql, conn, stored_pk, Index.of(detail) if live else None, fresh=not was_live)
        if live or was_live:
            action = ("updated" if was_live else "created") if live else "deleted"
            record_change(conn, revised, action, now)

    reclassified = 0
    newly_linked: list[LedgerEntry] = []
    for entry in entries:
        if entry.pk not in outcomes:
            continue  # moved: its new conversation's rebuild decides
        outcome, error, linked_here = outcomes[entry.pk]
        target = stored_pk if linked_here else None
        # Created, updated and unchanged depend on the order deliveries came in; only a change of standing counts.
        if entry.outcome in ACCEPTED and outcome in ACCEPTED and entry.conversation_pk == target:
            continue
        if (entry.outcome, entry.error, entry.conversation_pk) == (outcome, error, target):
            continue
        conn.execute(
            update(ledger).where(ledger.c.pk == entry.pk).values(outcome=outcome, error=error, conversation_pk=target)
        )
        reclassified += 1
        if target is not None and entry.conversation_pk != target:
            newly_linked.append(entry)
    if newly_linked and redact is not None:
        redacted = {m: Message.model_validate_json(t) for m, t in sql.run(conn, sql.redactions_of, params).fetchall()}
        for entry in newly_linked if redacted else ():
            if (clean := redact(entry.body, key.external_id, redacted)) is not None:
                sql.run(conn, sql.rewrite_body, {"body": clean, "b_pk": entry.pk})
    return Rebuilt(changed=changed, deliveries_reclassified=reclassified, moved=moved)
