"""``kbms ingest``: a file of conversations, as if each had been pushed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from kbms.backfill import IngestReport, UnreadableFile, ingest_file, readers_of
from kbms.cli.common import (
    DatabaseUrl,
    database_of,
    err,
    known_provider,
    out,
    require_current_schema,
    say,
    settings_of,
    text_option,
)
from kbms.cli.exits import REJECTED, Failure, database_failure
from kbms.model import WORKSPACE, WORKSPACE_PATTERN
from kbms.providers import DEFAULT_PROVIDER, REGISTRY, get_provider

SHOWN_REJECTS = 20


def ingest(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, metavar="FILE", help="NDJSON, a JSON document or array")
    ],
    provider: Annotated[
        str, typer.Option(metavar="PROVIDER", help=f"One of: {', '.join(REGISTRY)}")
    ] = DEFAULT_PROVIDER,
    workspace: Annotated[
        str | None,
        typer.Option(
            metavar="WORKSPACE",
            help="Workspace of the conversations (the provider account); default: what each payload says, "
            "else KBMS_DEFAULT_WORKSPACE",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(metavar="N", help="Worker processes for large files (default: one per core)", show_default=False),
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Ingest conversations from a file, exactly as if each had been pushed to the API, in batches."""
    settings = settings_of(database_url=database_url)
    text_option("--workspace", workspace)
    if workspace is not None and not re.fullmatch(WORKSPACE, workspace):
        raise Failure(f"--workspace {workspace!r} must match {WORKSPACE_PATTERN}")
    known_provider(provider)
    source = get_provider(provider)
    if jobs is not None and jobs < 1:
        raise Failure("--jobs must be at least 1")
    database = database_of(ctx, settings, database_url)
    require_current_schema(database)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,  # a bar is for a person watching: not for a log or a pipe
    ) as progress:
        task = progress.add_task("ingesting", total=file.stat().st_size)
        try:
            report = ingest_file(
                settings,
                source.name,
                file,
                workspace=workspace,
                jobs=jobs,
                advance=lambda done: progress.advance(task, done),
            )
        except UnreadableFile as exc:
            raise Failure(str(exc)) from None
    if report.unavailable is None and not report.results:
        raise Failure(f"{file} holds no conversations")
    _print_report(report)
    if report.unavailable is not None:
        after = "; the lines counted above are committed, and running it again leaves them unchanged"
        raise database_failure(report.unavailable, database, after=after)
    if report.rejects:
        if report.results["rejected"] == sum(report.results.values()):
            others = [p for p in REGISTRY.values() if p.name != source.name]
            readers = readers_of(
                file, others, workspace=workspace, default_workspace=settings.default_workspace, sample=SHOWN_REJECTS
            )
            if readers:
                say(
                    f"kbms: every line was rejected as {source.name}; they validate as {' or '.join(readers)}: "
                    f"run again with --provider {readers[0]}"
                )
        raise typer.Exit(REJECTED)


def _print_report(report: IngestReport) -> None:
    table = Table(title="kbms ingest")
    for name in ("created", "updated", "unchanged", "rejected"):
        table.add_column(name, justify="right")
    table.add_row(*(str(report.results[name]) for name in ("created", "updated", "unchanged", "rejected")))
    out.print(table)
    for number, reason in sorted(report.rejects)[:SHOWN_REJECTS]:
        say(f"line {number}: rejected: {reason}", console=out)
    if len(report.rejects) > SHOWN_REJECTS:
        say(f"... and {len(report.rejects) - SHOWN_REJECTS} more rejected lines", console=out)
