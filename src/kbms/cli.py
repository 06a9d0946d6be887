"""The ``kbms`` command: serve, migrate, ingest. Errors become exit codes here, and only here."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy.engine import Engine

from kbms.auth import SCOPES, Keyring, KeyringError, key_config, new_key
from kbms.backfill import IngestReport, UnreadableFile, ingest_file
from kbms.errors import KbmsError, StorageUnavailable
from kbms.export import FORMATS, ParquetUnavailable, parquet_schemas, write_export
from kbms.merge import micros
from kbms.model import WORKSPACE, WORKSPACE_PATTERN, State
from kbms.providers import DEFAULT_PROVIDER, REGISTRY, get_provider
from kbms.reprocess import ReprocessReport
from kbms.reprocess import reprocess as run_reprocess
from kbms.settings import Settings
from kbms.storage import admin_engine, open_store
from kbms.storage.base import Filters
from kbms.storage.migrate import current_revision, head_revision, is_current, upgrade

EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
SHOWN_REJECTS = 20

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kbms: conversation ingestion service.")
err = Console(stderr=True)
log = logging.getLogger(__name__)
out = Console()

DatabaseUrl = Annotated[
    str | None, typer.Option("--database-url", help="Overrides KBMS_DATABASE_URL", show_default=False)
]


def _settings(**overrides: object) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        for error in exc.errors():
            err.print(f"[red]configuration:[/] {'.'.join(map(str, error['loc']))}: {error['msg']}")
        raise typer.Exit(EXIT_USAGE) from None


@contextmanager
def _admin_engine(settings: Settings) -> Iterator[Engine]:
    """An engine for schema work; a URL kbms cannot use is a usage error."""
    try:
        engine = admin_engine(settings.database_url)
    except ValueError as exc:
        err.print(f"[red]KBMS_DATABASE_URL:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    try:
        yield engine
    finally:
        engine.dispose()


def _micros_of(value: datetime | None) -> int | None:
    """A command-line time as stored micros; a time without a zone is taken as UTC."""
    return None if value is None else micros(value if value.tzinfo else value.replace(tzinfo=UTC))


def _counting_progress() -> Progress:
    """The bar of the commands that count items (the total becomes known once the work has started)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def _require_current_schema(settings: Settings) -> None:
    with _admin_engine(settings) as engine:
        if not is_current(engine):
            found = current_revision(engine) or "empty"
            err.print(
                f"[red]The database schema is at {found}; this kbms needs {head_revision()}.[/] "
                "Run [bold]kbms migrate[/] first."
            )
            raise typer.Exit(EXIT_USAGE)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Overrides KBMS_HOST", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="Overrides KBMS_PORT", show_default=False)] = None,
    database_url: DatabaseUrl = None,
    workers: Annotated[int | None, typer.Option(help="Overrides KBMS_WORKERS", show_default=False)] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Serve without API keys on a non-loopback address (trusted networks)")
    ] = False,
) -> None:
    """Serve the HTTP API (the schema must be migrated first)."""
    # One process keeps its metrics in memory; several share a directory that kbms.workers sets up for the run.
    # An inherited directory would be read as this run's (and must be set before prometheus-client is imported).
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    import uvicorn

    from kbms.api import create_app
    from kbms.logs import configure_logging
    from kbms.server import uvicorn_arguments, uvicorn_options

    settings = _settings(host=host, port=port, database_url=database_url, workers=workers)
    configure_logging(settings.log_level)
    try:
        keyring = Keyring.configured(settings.api_keys, settings.api_keys_file)
    except KeyringError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_USAGE) from None
    if not keyring and not _is_loopback(settings.host) and not insecure:
        err.print(
            f"[red]No API keys are configured, so anyone who reaches {settings.host} could read every "
            "conversation.[/] Configure keys (KBMS_API_KEYS, see `kbms keys create`), bind to 127.0.0.1, or pass "
            "--insecure on a network you trust."
        )
        raise typer.Exit(EXIT_USAGE)
    if not keyring:
        log.warning("no API keys configured: /internal and /integrations are open to whoever reaches %s", settings.host)
    _require_current_schema(settings)
    server: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "log_level": settings.log_level,
        "access_log": False,
        "server_header": False,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **server, **uvicorn_options(settings))
        return
    # Worker processes build their own app from KBMS_* variables: hand them the settings in effect here. And the
    # supervisor only supervises: replacing this process by a lean one (kbms.workers: uvicorn's supervisor, and the
    # run's metrics directory) keeps the app out of it (93 MB here, against about 25 MB), which counts three
    # processes over.
    os.environ.update(
        {f"KBMS_{name.upper()}": str(value) for name, value in settings.model_dump().items() if value is not None}
    )
    arguments = [
        sys.executable,
        "-m",
        "kbms.workers",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--workers",
        str(settings.workers),
        "--log-level",
        settings.log_level,
        *uvicorn_arguments(settings),
    ]
    os.execv(sys.executable, arguments)  # noqa: S606 (our own interpreter, with arguments we built)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


keys_app = typer.Typer(no_args_is_help=True, help="API keys.")
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def create_key(
    name: Annotated[str, typer.Option(help="Who or what uses the key (shown in logs)")],
    scope: Annotated[list[str], typer.Option(help=f"One of {', '.join(SCOPES)}; repeat for more")],
    workspace: Annotated[
        list[str] | None, typer.Option(help="Limit the key to this workspace; repeat for more (default: all)")
    ] = None,
) -> None:
    """Make a new API key: prints the key (shown only now) and the entry to add to KBMS_API_KEYS."""
    token = new_key()
    try:
        entry = key_config(token, name=name, scopes=scope, workspaces=workspace)  # type: ignore[arg-type]
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            err.print(f"[red]{'.'.join(str(p) for p in error['loc'])}[/]: {error['msg']}")
        raise typer.Exit(EXIT_USAGE) from None
    err.print("The key (give it to its user; kbms keeps only its hash, so it cannot be shown again):")
    out.print(token, highlight=False)
    err.print("Add this entry to the JSON list in KBMS_API_KEYS (or KBMS_API_KEYS_FILE):")
    out.print(entry, highlight=False, soft_wrap=True)


@app.command()
def migrate(database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the database schema (safe to run again)."""
    settings = _settings(database_url=database_url)
    with _admin_engine(settings) as engine:
        before = current_revision(engine)
        upgrade(engine)
        after = current_revision(engine)
    if before == after:
        out.print(f"Database already at revision {after}.")
    else:
        out.print(f"Database migrated from {before or 'empty'} to {after}.")


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="NDJSON, a JSON document or array")],
    provider: Annotated[str, typer.Option(help=f"One of: {', '.join(REGISTRY)}")] = DEFAULT_PROVIDER,
    workspace: Annotated[
        str | None,
        typer.Option(
            help="Workspace of the conversations (the provider account); default: what each payload says, "
            "else KBMS_DEFAULT_WORKSPACE",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(help="Worker processes for large files (default: one per core)", show_default=False),
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Ingest conversations from a file, exactly as if each had been pushed to the API, in batches."""
    settings = _settings(database_url=database_url)
    if workspace is not None and not re.fullmatch(WORKSPACE, workspace):
        err.print(f"[red]--workspace {workspace!r}[/] must match {WORKSPACE_PATTERN}")
        raise typer.Exit(EXIT_USAGE)
    try:
        source = get_provider(provider)
    except KbmsError as exc:
        err.print(f"[red]{exc.message}[/] (known: {', '.join(REGISTRY)})")
        raise typer.Exit(EXIT_USAGE) from None
    if jobs is not None and jobs < 1:
        err.print("[red]--jobs[/] must be at least 1")
        raise typer.Exit(EXIT_USAGE)
    _require_current_schema(settings)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
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
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(EXIT_USAGE) from None
    _print_report(report)
    if report.unavailable is not None:
        err.print(f"[red]{report.unavailable}[/]: stopped; what was reported above is committed, run it again")
        raise typer.Exit(EXIT_UNAVAILABLE)
    if report.rejects:
        raise typer.Exit(EXIT_REJECTED)


@app.command()
def reprocess(
    provider: Annotated[str | None, typer.Option(help="Only deliveries from this provider")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Only deliveries received at or after this time (UTC unless given)")
    ] = None,
    conversation_id: Annotated[str | None, typer.Option(help="Only this conversation (kbms's id)")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Re-derive stored conversations from the raw ledger with today's mappers (after a mapper fix)."""
    settings = _settings(database_url=database_url)
    if provider is not None and provider not in REGISTRY:
        err.print(f"[red]Unknown provider {provider!r}[/] (known: {', '.join(REGISTRY)})")
        raise typer.Exit(EXIT_USAGE)
    _require_current_schema(settings)
    start = _micros_of(since)

    async def run() -> ReprocessReport:
        store = open_store(settings)
        try:
            with _counting_progress() as bar:
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

    try:
        report = asyncio.run(run())
    except StorageUnavailable as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    table = Table(title="kbms reprocess")
    for name in ("conversations re-derived", "changed", "unchanged", "deliveries reclassified"):
        table.add_column(name, justify="right")
    unchanged = report.conversations - report.changed
    table.add_row(*map(str, (report.conversations, report.changed, unchanged, report.deliveries_reclassified)))
    out.print(table)


@app.command()
def export(
    destination: Annotated[
        Path, typer.Option("--out", help="File to write (a directory for parquet)", show_default=False)
    ],
    fmt: Annotated[
        str, typer.Option("--format", help="ndjson (the detail JSON), csv (a row per conversation) or parquet")
    ] = "ndjson",
    provider: Annotated[str | None, typer.Option(help="Only this provider's")] = None,
    workspace: Annotated[str | None, typer.Option(help="Only this workspace's")] = None,
    state: Annotated[str | None, typer.Option(help="Only conversations in this state")] = None,
    tag: Annotated[str | None, typer.Option(help="Only conversations with this tag")] = None,
    updated_after: Annotated[
        datetime | None, typer.Option(help="Only updated after this time (UTC unless given)")
    ] = None,
    updated_before: Annotated[
        datetime | None, typer.Option(help="Only updated before this time (UTC unless given)")
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Export live conversations (from one consistent snapshot) for notebooks and spreadsheets."""
    settings = _settings(database_url=database_url)
    if fmt not in FORMATS:
        err.print(f"[red]--format {fmt!r}[/]: one of {', '.join(FORMATS)}")
        raise typer.Exit(EXIT_USAGE)
    if provider is not None and provider not in REGISTRY:
        err.print(f"[red]Unknown provider {provider!r}[/] (known: {', '.join(REGISTRY)})")
        raise typer.Exit(EXIT_USAGE)
    if state is not None and state not in get_args(State):
        err.print(f"[red]--state {state!r}[/]: one of {', '.join(get_args(State))}")
        raise typer.Exit(EXIT_USAGE)
    if fmt == "parquet":
        try:
            parquet_schemas()
        except ParquetUnavailable as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(EXIT_USAGE) from None
    _require_current_schema(settings)

    filters = Filters(
        provider=provider,
        workspace=workspace,
        state=state,
        tag=tag,
        updated_after=_micros_of(updated_after),
        updated_before=_micros_of(updated_before),
    )

    async def run() -> int:
        store = open_store(settings)
        try:
            with _counting_progress() as bar:
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
    except StorageUnavailable as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    except OSError as exc:
        err.print(f"[red]{destination}: {exc.strerror or exc}[/]")
        raise typer.Exit(EXIT_USAGE) from None
    where = (
        f"{destination / 'conversations.parquet'} and {destination / 'messages.parquet'}"
        if fmt == "parquet"
        else str(destination)
    )
    out.print(f"Exported {written} conversations to {where}.", markup=False, highlight=False, soft_wrap=True)


def _print_report(report: IngestReport) -> None:
    table = Table(title="kbms ingest")
    for name in ("created", "updated", "unchanged", "rejected"):
        table.add_column(name, justify="right")
    table.add_row(*(str(report.results[name]) for name in ("created", "updated", "unchanged", "rejected")))
    out.print(table)
    for number, reason in sorted(report.rejects)[:SHOWN_REJECTS]:
        out.print(f"line {number}: rejected: {reason}", markup=False, highlight=False, soft_wrap=True)
    if len(report.rejects) > SHOWN_REJECTS:
        out.print(f"... and {len(report.rejects) - SHOWN_REJECTS} more rejected lines")


def main() -> None:
    app()
