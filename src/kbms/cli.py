"""The ``kbms`` command: serve, migrate, ingest, reprocess, export, keys.

Failures become exit codes here, and only here: a command raises ``kbms.exits.Failure`` (or lets a database or
input error through), and ``Group.invoke`` tells it in one line with the exit code of ``kbms.exits``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import re
import socket
import sys
import traceback
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
from typer.core import TyperCommand, TyperGroup, TyperOption

from kbms import __version__
from kbms.auth import SCOPES, Keyring, KeyringError, key_config, new_key
from kbms.backfill import IngestReport, UnreadableFile, ingest_file, readers_of
from kbms.exits import REJECTED, USAGE, Database, Failure, database_failure, explain
from kbms.export import FORMATS, ParquetUnavailable, parquet_schemas, write_export
from kbms.merge import micros
from kbms.model import WORKSPACE, WORKSPACE_PATTERN, State
from kbms.providers import DEFAULT_PROVIDER, REGISTRY, get_provider
from kbms.reprocess import ReprocessReport
from kbms.reprocess import reprocess as run_reprocess
from kbms.settings import Settings
from kbms.storage import admin_engine, open_store, parse_database_url, reading_engine
from kbms.storage.base import Filters
from kbms.storage.migrate import current_revision, head_revision, is_known, upgrade

SHOWN_REJECTS = 20
DATABASE_KEY = "kbms.database"  # where a command leaves its Database in the click context, for the failure's message

err = Console(stderr=True)
log = logging.getLogger(__name__)
out = Console()


def _say(message: str, *, console: Console = err) -> None:
    """A line as it is: no Rich markup (``kbms[parquet]`` is text, as are file names and user input)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _debugging(ctx: typer.Context | None) -> bool:
    root = ctx.find_root() if ctx is not None else None
    asked = root is not None and bool(root.params.get("debug"))
    return asked or os.environ.get("KBMS_LOG_LEVEL", "").strip().lower() == "debug"


def _usage_failure(exc: BaseException) -> Failure | None:
    """Click's usage errors (a bad or missing flag value, an unknown command) as one line; None for others."""
    if not isinstance(exc, typer.TyperException) or getattr(exc, "exit_code", None) != USAGE:
        return None
    if type(exc).__name__ == "NoArgsIsHelpError":  # `kbms` alone: the help is the answer (Typer checks by name too)
        return None
    ctx = getattr(exc, "ctx", None)
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    see = f" (see {' '.join(['kbms', *names])} --help)"
    return Failure(f"{exc.format_message().rstrip('.')}{see}")


def _fail(exc: Exception, ctx: typer.Context | None) -> typer.Exit:
    """The exit of a failure, told in one line (see ``kbms.exits``); ``exc`` itself again for a bug."""
    failure = _usage_failure(exc) or explain(exc, ctx.meta.get(DATABASE_KEY) if ctx is not None else None)
    if failure is None:
        raise exc  # a bug: its traceback is the report
    _say(f"kbms: {failure.message}")
    if _debugging(ctx):
        traceback.print_exception(exc, file=sys.stderr)
    return typer.Exit(failure.code)


def _without_placeholder(option: Any) -> Any:
    """The ``--help`` flag, shown without the ``<bool>`` placeholder Typer gives flags."""
    if option is not None:
        option.metavar = ""
    return option


class Command(TyperCommand):
    def get_help_option(self, ctx: typer.Context) -> TyperOption | None:  # type: ignore[override]
        return _without_placeholder(super().get_help_option(ctx))  # type: ignore[no-any-return]


class Group(TyperGroup):
    """The ``kbms`` group: runs a command, and tells its failure in one line."""

    def get_help_option(self, ctx: typer.Context) -> TyperOption | None:  # type: ignore[override]
        return _without_placeholder(super().get_help_option(ctx))  # type: ignore[no-any-return]

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        # The group's own options are parsed here, before invoke (a subcommand's are parsed within it).
        try:
            return super().make_context(*args, **kwargs)
        except typer.TyperException as exc:
            raise _fail(exc, None) from None

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            raise _fail(exc, ctx) from None


app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    help="kbms: conversation ingestion service.",
    # A bug's traceback without the values of local variables: they include settings, URLs and payloads.
    pretty_exceptions_show_locals=False,
)
command = app.command


def _print_version(value: bool) -> None:
    if value:
        _say(f"kbms {__version__}", console=out)
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="On a failure, print the traceback after its one-line message", metavar=""),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit", is_eager=True, callback=_print_version, metavar=""
        ),
    ] = False,
) -> None:
    """kbms: conversation ingestion service."""


DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", metavar="URL", help="Overrides KBMS_DATABASE_URL", show_default=False),
]


def _settings(**overrides: object) -> Settings:
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            field = str(error["loc"][0]) if error["loc"] else ""
            name = f"--{field.replace('_', '-')}" if field in given else f"KBMS_{field.upper()}"
            problems.append(f"{name}: {error['msg']}" if field else error["msg"])
        raise Failure("; ".join(problems)) from None


def _database(ctx: typer.Context, settings: Settings, flag: str | None, *, create: bool = False) -> Database:
    """The database of this command. Only ``kbms migrate`` (``create``) may find no SQLite file there."""
    try:
        url = parse_database_url(settings.database_url)
    except ValueError as exc:
        raise Failure(f"{'--database-url' if flag is not None else 'KBMS_DATABASE_URL'}: {exc}") from None
    database = Database(url, named_by_flag=flag is not None, timeout=settings.db_timeout)
    ctx.meta[DATABASE_KEY] = database
    if not create and database.file is not None and not database.file.exists():
        raise Failure(f"no database at {database.file.absolute()}: run {database.migrate_command} first")
    return database


def _require_current_schema(database: Database) -> None:
    """Refuse a database whose schema is not this kbms's. Reads only: no write lock, no file created."""
    engine = reading_engine(database.url.render_as_string(hide_password=False))
    try:
        found = current_revision(engine)
    finally:
        engine.dispose()
    needed = head_revision()
    _refuse_a_newer_schema(database, found)
    if found != needed:
        raise Failure(
            f"the database {database.shown} is not migrated (its schema is at {found or 'empty'}, this kbms needs "
            f"{needed}): run {database.migrate_command}"
        )


def _refuse_a_newer_schema(database: Database, found: str | None) -> None:
    if found is not None and not is_known(found):
        raise Failure(
            f"the schema of the database {database.shown} is at {found}, a revision of a newer kbms (this one goes "
            f"up to {head_revision()}): run that kbms, or this one against another database"
        )


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
        disable=not err.is_terminal,  # a bar is for a person watching: not for a log or a pipe
    )


def _known_provider(provider: str | None) -> None:
    if provider is not None and provider not in REGISTRY:
        raise Failure(f"Unknown provider {provider!r} (known: {', '.join(REGISTRY)}): pass --provider with one of them")


@command(cls=Command)
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(metavar="HOST", help="Overrides KBMS_HOST", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(metavar="PORT", help="Overrides KBMS_PORT", show_default=False)] = None,
    database_url: DatabaseUrl = None,
    workers: Annotated[int | None, typer.Option(metavar="N", help="Overrides KBMS_WORKERS", show_default=False)] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", metavar="", help="Serve without API keys on a non-loopback address (trusted networks)"
        ),
    ] = False,
) -> None:
    """Serve the HTTP API (the schema must be migrated first)."""
    # One process keeps its metrics in memory; several share a directory that kbms.workers sets up for the run.
    # An inherited directory would be read as this run's (and must be set before prometheus-client is imported).
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    import uvicorn

    from kbms.api import create_app
    from kbms.logs import configure_logging
    from kbms.server import listening_socket, uvicorn_arguments, uvicorn_options

    settings = _settings(host=host, port=port, database_url=database_url, workers=workers)
    configure_logging(settings.log_level)
    try:
        keyring = Keyring.configured(settings.api_keys, settings.api_keys_file)
    except KeyringError as exc:
        raise Failure(str(exc)) from None
    if not keyring and not _is_loopback(settings.host) and not insecure:
        raise Failure(
            f"no API keys are configured, so anyone who reaches {settings.host} could read every conversation: "
            "configure keys (KBMS_API_KEYS, see kbms keys create), bind to 127.0.0.1, or pass --insecure on a "
            "network you trust"
        )
    _require_current_schema(_database(ctx, settings, database_url))
    # Bound here, before the app starts: uvicorn binds after the application's startup, and then only logs a port
    # in use, after "Application startup complete".
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as exc:
        raise Failure(_cannot_listen(settings.host, settings.port, exc)) from None
    if not keyring:
        log.warning("no API keys configured: /internal and /integrations are open to whoever reaches %s", settings.host)
    if settings.workers == 1:
        config = uvicorn.Config(
            create_app(settings),
            log_config=None,
            log_level=settings.log_level,
            access_log=False,
            server_header=False,
            **uvicorn_options(settings),
        )
        server = uvicorn.Server(config)
        log.info("listening on http://%s", _address(settings.host, sock.getsockname()[1]))
        server.run(sockets=[sock])  # a failing startup of the app exits here (uvicorn has logged why)
        return
    # uvicorn's supervisor binds its own socket for its workers: this one only proved the address usable (a port
    # taken in the moment between is then reported by uvicorn).
    sock.close()
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


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    address = _address(host, port)
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {address} (unknown host): pass --host ADDRESS (or set KBMS_HOST)"
    if exc.errno == errno.EADDRINUSE:
        return f"{address} is already in use: pass --port N (or set KBMS_PORT)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {address} (not an address of this machine): pass --host ADDRESS (or set KBMS_HOST)"
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {address} (permission denied: ports below 1024 need privileges): pass --port N "
            "(or set KBMS_PORT)"
        )
    return f"cannot listen on {address} ({exc.strerror or exc}): pass --host ADDRESS or --port N"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


keys_app = typer.Typer(cls=Group, no_args_is_help=True, help="API keys.")
app.add_typer(keys_app, name="keys")


@keys_app.command("create", cls=Command)
def create_key(
    name: Annotated[str, typer.Option(metavar="NAME", help="Who or what uses the key (shown in logs)")],
    scope: Annotated[list[str], typer.Option(metavar="SCOPE", help=f"One of {', '.join(SCOPES)}; repeat for more")],
    workspace: Annotated[
        list[str] | None,
        typer.Option(metavar="WORKSPACE", help="Limit the key to this workspace; repeat for more (default: all)"),
    ] = None,
) -> None:
    """Make a new API key: prints the key (shown only now) and the entry to add to KBMS_API_KEYS."""
    token = new_key()
    try:
        entry = key_config(token, name=name, scopes=scope, workspaces=workspace)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        ]
        raise Failure("; ".join(problems)) from None
    err.print("The key (give it to its user; kbms keeps only its hash, so it cannot be shown again):")
    _say(token, console=out)
    err.print("Add this entry to the JSON list in KBMS_API_KEYS (or KBMS_API_KEYS_FILE):")
    _say(entry, console=out)


@command(cls=Command)
def migrate(ctx: typer.Context, database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the database schema (safe to run again)."""
    settings = _settings(database_url=database_url)
    database = _database(ctx, settings, database_url, create=True)
    engine = admin_engine(settings.database_url)
    try:
        before = current_revision(engine)
        _refuse_a_newer_schema(database, before)
        upgrade(engine)
        after = current_revision(engine)
    finally:
        engine.dispose()
    if before == after:
        _say(f"Database {database.shown} already at revision {after}.", console=out)
    else:
        _say(f"Database {database.shown} migrated from {before or 'empty'} to {after}.", console=out)


@command(cls=Command)
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
    settings = _settings(database_url=database_url)
    if workspace is not None and not re.fullmatch(WORKSPACE, workspace):
        raise Failure(f"--workspace {workspace!r} must match {WORKSPACE_PATTERN}")
    _known_provider(provider)
    source = get_provider(provider)
    if jobs is not None and jobs < 1:
        raise Failure("--jobs must be at least 1")
    database = _database(ctx, settings, database_url)
    _require_current_schema(database)
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
        after = "; what is counted above is committed, run it again once it is back"
        raise database_failure(report.unavailable, database, after=after)
    if report.rejects:
        if report.results["rejected"] == sum(report.results.values()):
            others = [p for p in REGISTRY.values() if p.name != source.name]
            readers = readers_of(
                file, others, workspace=workspace, default_workspace=settings.default_workspace, sample=SHOWN_REJECTS
            )
            if readers:
                _say(
                    f"kbms: every line was rejected as {source.name}; they validate as {' or '.join(readers)}: "
                    f"run again with --provider {readers[0]}"
                )
        raise typer.Exit(REJECTED)


@command(cls=Command)
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
    settings = _settings(database_url=database_url)
    _known_provider(provider)
    database = _database(ctx, settings, database_url)
    _require_current_schema(database)
    start = _micros_of(since)

    async def run() -> ReprocessReport:
        store = open_store(settings)
        try:
            if conversation_id is not None and not await store.conversations_in_scope(
                provider=None, since=None, conversation_id=conversation_id
            ):
                raise Failure(
                    f"no conversation {conversation_id!r} in {database.shown}: pass kbms's id of a stored "
                    "conversation (the id field of GET /internal/conversations)"
                )
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
        _say(
            f"kbms: nothing to reprocess: {f'no stored delivery matches {scope}' if scope else 'no delivery is stored'}"
        )


@command(cls=Command)
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
    settings = _settings(database_url=database_url)
    if fmt not in FORMATS:
        raise Failure(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    _known_provider(provider)
    if state is not None and state not in get_args(State):
        raise Failure(f"--state {state!r}: one of {', '.join(get_args(State))}")
    if fmt == "parquet":
        try:
            parquet_schemas()
        except ParquetUnavailable as exc:
            raise Failure(str(exc)) from None
    database = _database(ctx, settings, database_url)
    _require_current_schema(database)

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
    except OSError as exc:
        raise Failure(f"{destination}: {exc.strerror or exc}") from None
    where = (
        f"{destination / 'conversations.parquet'} and {destination / 'messages.parquet'}"
        if fmt == "parquet"
        else str(destination)
    )
    _say(f"Exported {written} conversations to {where}.", console=out)


def _print_report(report: IngestReport) -> None:
    table = Table(title="kbms ingest")
    for name in ("created", "updated", "unchanged", "rejected"):
        table.add_column(name, justify="right")
    table.add_row(*(str(report.results[name]) for name in ("created", "updated", "unchanged", "rejected")))
    out.print(table)
    for number, reason in sorted(report.rejects)[:SHOWN_REJECTS]:
        _say(f"line {number}: rejected: {reason}", console=out)
    if len(report.rejects) > SHOWN_REJECTS:
        _say(f"... and {len(report.rejects) - SHOWN_REJECTS} more rejected lines", console=out)


def main() -> None:
    app(prog_name="kbms")  # also under python -m kbms
