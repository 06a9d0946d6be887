"""``kbms sync``: one pass over the configured sources (``KBMS_SOURCES``): the first pass is the backfill."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from kbms.cli.common import DatabaseUrl, counting_progress, database_of, out, require_current_schema, settings_of
from kbms.cli.exits import REJECTED, Failure
from kbms.providers import get_provider
from kbms.providers.pull import SourceConfig
from kbms.storage import open_store
from kbms.storage.base import Store
from kbms.sync.policy import PassReport, SyncPolicy
from kbms.sync.runner import Pass
from kbms.sync.sources import SourcesError, sources_of

COLUMNS = ("listed", "skipped", "fetched", "created", "updated", "unchanged", "deleted", "rejected", "dead letters")


def sync(
    ctx: typer.Context,
    provider: Annotated[str | None, typer.Option(metavar="PROVIDER", help="Only the sources of this provider")] = None,
    workspace: Annotated[
        str | None, typer.Option(metavar="WORKSPACE", help="Only the source of this workspace")
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="List everything again, ignoring the checkpoint", metavar="")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Pull conversations from the configured sources (KBMS_SOURCES): the first pass is the backfill, later ones
    fetch what changed. Exits 1 if a conversation ended among the dead letters, 4 if a provider refused the
    credentials, 5 if it could not be reached."""
    settings = settings_of(database_url=database_url)
    try:
        sources = sources_of(settings)
    except SourcesError as exc:
        raise Failure(str(exc)) from None
    if not sources:
        raise Failure("no sources are configured: set KBMS_SOURCES or KBMS_SOURCES_FILE (see the README)")
    chosen = [
        source
        for source in sources
        if (provider is None or source.provider == provider) and (workspace is None or source.workspace == workspace)
    ]
    if not chosen:
        known = ", ".join(f"{s.provider}/{s.workspace}" for s in sources)
        raise Failure(f"no configured source matches --provider/--workspace (configured: {known})")
    database = database_of(ctx, settings, database_url)
    require_current_schema(database)

    async def run() -> list[PassReport]:
        store = open_store(settings, command=True)
        reports = []
        try:
            with counting_progress() as bar:
                for source in chosen:
                    reports.append(await _one(store, source, full=full, bar=bar))
        finally:
            await store.close()
        return reports

    reports = asyncio.run(run())
    # A row per figure and a column per source: readable in 80 columns for a few sources.
    table = Table(title="kbms sync")
    table.add_column("")
    for report in reports:
        table.add_column(f"{report.provider}/{report.workspace}", justify="right")
    for name in COLUMNS:
        attribute = "dead" if name == "dead letters" else name
        table.add_row(name, *(str(getattr(report, attribute)) for report in reports))
    out.print(table)
    left = sum(report.left_queued for report in reports)
    if left:
        raise Failure(
            f"{left} conversation(s) are still queued (claimed by another kbms process, or due later): run kbms sync "
            "again, or let kbms serve take them up",
            REJECTED,
        )
    dead = sum(report.dead for report in reports)
    if dead:
        raise Failure(
            f"{dead} conversation(s) ended among the dead letters (GET /internal/sources lists them; retry them "
            "after fixing the cause)",
            REJECTED,
        )


async def _one(store: Store, source: SourceConfig, *, full: bool, bar: Progress) -> PassReport:
    provider = get_provider(source.provider)
    puller = provider.puller
    assert puller is not None  # sources_of admits only providers kbms can pull from
    client = puller.client(source)
    task: TaskID = bar.add_task(f"{source.provider}/{source.workspace}: listing", total=None)

    def progress(report: PassReport) -> None:
        done = report.skipped + report.fetched
        stage = "fetching" if report.listing_done else "listing"
        waits = client.stats.rate_limit_waits
        bar.update(
            task,
            description=f"{source.provider}/{source.workspace}: {stage}, {report.stored} stored, {waits} waits",
            completed=done,
            total=report.listed if report.listing_done else None,
        )

    try:
        policy = SyncPolicy(drain=True)  # "done" means every listed conversation is stored, or a dead letter
        return await Pass(store, provider, source, client, full=full, policy=policy, progress=progress).run()
    finally:
        await client.aclose()
        bar.remove_task(task)
