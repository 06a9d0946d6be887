"""``kbms reprocess``: stored conversations derived again from the raw ledger."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from kbms.cli.common import (
    DatabaseUrl,
    counting_progress,
    database_of,
    known_provider,
    micros_of,
    out,
    require_current_schema,
    say,
    settings_of,
    text_option,
)
from kbms.cli.exits import Failure
from kbms.model import CONVERSATION_ID
from kbms.reprocess import ReprocessReport
from kbms.reprocess import reprocess as run_reprocess
from kbms.storage import open_store


def reprocess(
    ctx: typer.Context,
    provider: Annotated[str | None, typer.Option(metavar="PROVIDER", help="Only deliveries from this provider")] = None,
    since: Annotated[
        datetime | None,
        typer.Option(metavar="TIME", help="Only deliveries received at or after this time (UTC unless given)"),
    ] = None,
    conversation_id: Annotated[
        str | None, typer.Option(metavar="ID", help="Only this conversation (kbms's id)")
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Re-derive stored conversations from the raw ledger with today's mappers (after a mapper fix)."""
    settings = settings_of(database_url=database_url)
    known_provider(provider)
    text_option("--conversation-id", conversation_id)
    if conversation_id is not None and not CONVERSATION_ID.fullmatch(conversation_id):
        # kbms mints every id: other text names no conversation, and need not reach the database to learn so.
        raise Failure(
            f"--conversation-id {conversation_id!r} is not a conversation id: pass kbms's id of a stored "
            "conversation (a UUID: the id field of GET /internal/conversations)"
        )
    database = database_of(ctx, settings, database_url)
    require_current_schema(database)
    start = micros_of(since)

    async def run() -> ReprocessReport:
        store = open_store(settings, command=True)
        try:
            if conversation_id is not None and not await store.conversations_in_scope(
                provider=None, since=None, conversation_id=conversation_id
            ):
                raise Failure(
                    f"no conversation {conversation_id!r} in {database.shown}: pass kbms's id of a stored "
                    "conversation (the id field of GET /internal/conversations)"
                )
            with counting_progress() as bar:
                task = bar.add_task("re-deriving", total=None)
                return await run_reprocess(
                    store,
                    provider=provider,
                    since=start,
                    conversation_id=conversation_id,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
        finally:
            await store.close()

    report = asyncio.run(run())
    table = Table(title="kbms reprocess")
    for name in ("conversations re-derived", "changed", "unchanged", "deliveries reclassified"):
        table.add_column(name, justify="right")
    unchanged = report.conversations - report.changed
    table.add_row(*map(str, (report.conversations, report.changed, unchanged, report.deliveries_reclassified)))
    out.print(table)
    if report.conversations == 0 and report.deliveries_reclassified == 0:
        scope = " ".join(
            f"{flag} {value}"
            for flag, value in (("--provider", provider), ("--since", since), ("--conversation-id", conversation_id))
            if value is not None
        )
        # Not a failure: a scheduled run that finds nothing new is doing its job.
        say(
            f"kbms: nothing to reprocess: {f'no stored delivery matches {scope}' if scope else 'no delivery is stored'}"
        )
