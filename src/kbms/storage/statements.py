"""Every statement kbms runs, built once per engine, and the driver fast path that runs the hot ones.

The other storage modules take a ``Sql`` and an open connection; none of them builds a statement on a hot path.
What the engines' SQL differs in, each engine gives as its ``SqlFlavor``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Subquery,
    Table,
    TextClause,
    and_,
    bindparam,
    or_,
    select,
    update,
)
from sqlalchemy import delete as delete_
from sqlalchemy.engine import Dialect

from kbms.deliveries import Keyed
from kbms.storage.base import Filters
from kbms.storage.filters import filter_conditions, filter_shape
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


@dataclass(frozen=True, slots=True)
class SqlFlavor:
    """What an engine's SQL differs in: each engine gives one (``kbms.storage.backend.Backend.flavor``)."""

    insert: InsertFactory
    # A conversation's search document: written (binds ``b_pk``, ``b_document``) and removed (``b_pk``).
    index_document: TextClause
    unindex: TextClause
    # Where search documents are written (see ``feed.write_index``): True, at the end of the transaction, outside
    # every savepoint; False, inside each write's savepoint.
    defer_documents: bool
    # The search window for these filter conditions, ranked: a subquery "ranked" of columns ``pk`` and ``score``
    # (higher is better), bound by ``b_query`` and ``b_window`` (see ``Sql.search``).
    ranked: Callable[[Sequence[ColumnElement[bool]]], Subquery]
    # ``b_query`` for the words of a search (``kbms.search.query_terms``): all of them required, none an operator.
    search_query: Callable[[Sequence[str]], str]
    # What a writer runs before numbering the feed's rows, so that numbers become visible in commit order (see
    # ``feed.flush_changes``); None: writers are one at a time already.
    feed_lock: TextClause | None
    # A block of statements whose results nobody reads, sent together: one round trip to a server (PostgreSQL's
    # pipeline mode) instead of one each; an error surfaces by the block's end at the latest.
    pipelined: Callable[[Connection], AbstractContextManager[object]]
    # True: a write alone in its transaction (one ingestion) keeps the statements it reads nothing back from until
    # the commit, and they go in the commit's block (``feed.write``). False: they run at once, since a round trip
    # costs nothing in process.
    late_writes: bool
    # What refreshes the planner's statistics of the tables lists and searches read, after a bulk load (``kbms
    # ingest``); None: the engine plans those reads without them.
    analyze: TextClause | None


CHILD_TABLES: tuple[tuple[Table, tuple[str, ...]], ...] = (
    (participants, ("conversation_pk", "participant_id")),
    (messages, ("conversation_pk", "message_id")),
    (events, ("conversation_pk", "event_id")),
)


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

    def __init__(self, flavor: SqlFlavor, dialect: Dialect) -> None:
        self._dialect = dialect
        self._flavor = flavor
        insert = flavor.insert
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
        self.defer_documents = flavor.defer_documents
        self.index_document = flavor.index_document
        self.unindex = flavor.unindex
        self.search_query = flavor.search_query
        self.feed_lock = flavor.feed_lock
        self.pipelined = flavor.pipelined
        self.late_writes = flavor.late_writes
        self.analyze = flavor.analyze
        self._statements: dict[tuple[object, ...], Any] = {}

    @property
    def flavor(self) -> SqlFlavor:
        return self._flavor

    def page(self, after: bool, filters: Filters, *, export: bool = False) -> Any:
        """The list (or export) statement for this combination of filters, built once per combination."""
        shape = ("export" if export else "page", after, *filter_shape(filters))
        cached = self._statements.get(shape)
        if cached is not None:
            return cached
        c = conversations.c
        columns = (c.detail, c.updated_at, c.id) if export else SUMMARY_COLUMNS
        statement: Any = select(*columns).where(c.deleted_at.is_(None), *filter_conditions(filters))
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
        shape = ("search", *filter_shape(filters))
        cached = self._statements.get(shape)
        if cached is not None:
            return cached
        c = conversations.c
        conditions = filter_conditions(filters)
        ranked = self._flavor.ranked(conditions)
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


def key_params(keyed: Keyed) -> dict[str, str]:
    """The binds of a conversation's key: ``b_`` and ``k_`` names are parameters, never columns (``Sql._compile``)."""
    return {"k_provider": keyed.provider, "k_workspace": keyed.workspace, "k_external_id": keyed.external_id}
