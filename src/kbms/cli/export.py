"""``kbms export``: live conversations from one snapshot, for notebooks and spreadsheets."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Annotated, get_args

import typer

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
from kbms.export import FORMATS, ParquetUnavailable, parquet_schemas, write_export
from kbms.model import State
from kbms.storage import open_store
from kbms.storage.base import Filters


def export(
    ctx: typer.Context,
    destination: Annotated[
        Path,
        typer.Option("--out", metavar="PATH", help="File to write (a directory for parquet)", show_default=False),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format", metavar="FORMAT", help="ndjson (the detail JSON), csv (a row per conversation) or parquet"
        ),
    ] = "ndjson",
    provider: Annotated[str | None, typer.Option(metavar="PROVIDER", help="Only this provider's")] = None,
    workspace: Annotated[str | None, typer.Option(metavar="WORKSPACE", help="Only this workspace's")] = None,
    state: Annotated[str | None, typer.Option(metavar="STATE", help="Only conversations in this state")] = None,
    tag: Annotated[str | None, typer.Option(metavar="TAG", help="Only conversations with this tag")] = None,
    updated_after: Annotated[
        datetime | None, typer.Option(metavar="TIME", help="Only updated after this time (UTC unless given)")
    ] = None,
    updated_before: Annotated[
        datetime | None, typer.Option(metavar="TIME", help="Only updated before this time (UTC unless given)")
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Export live conversations (from one consistent snapshot) for notebooks and spreadsheets."""
    settings = settings_of(database_url=database_url)
    if fmt not in FORMATS:
        raise Failure(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    known_provider(provider)
    for flag, value in (("--workspace", workspace), ("--state", state), ("--tag", tag)):
        text_option(flag, value)
    if state is not None and state not in get_args(State):
        raise Failure(f"--state {state!r}: one of {', '.join(get_args(State))}")
    if fmt == "parquet":
        try:
            parquet_schemas()
        except ParquetUnavailable as exc:
            raise Failure(str(exc)) from None
    database = database_of(ctx, settings, database_url)
    require_current_schema(database)

    filters = Filters(
        provider=provider,
        workspace=workspace,
        state=state,
        tag=tag,
        updated_after=micros_of(updated_after),
        updated_before=micros_of(updated_before),
    )

    async def run() -> int:
        store = open_store(settings, command=True)
        try:
            with counting_progress() as bar:
                task = bar.add_task("exporting", total=None)
                batches = store.export(filters)
                try:
                    return await write_export(
                        batches,
                        fmt,
                        destination,
                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                    )
                finally:
                    await batches.aclose()
        finally:
            await store.close()

    try:
        written = asyncio.run(run())
    except OSError as exc:
        raise Failure(f"{destination}: {exc.strerror or exc}") from None
    where = (
        f"{destination / 'conversations.parquet'} and {destination / 'messages.parquet'}"
        if fmt == "parquet"
        else str(destination)
    )
    say(f"Exported {written} conversations to {where}.", console=out)
