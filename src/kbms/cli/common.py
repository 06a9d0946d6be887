"""What the commands share: the consoles, settings and database of a command, the schema check, the bars."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kbms.cli.exits import Database, Failure, printable
from kbms.model import UNSTORABLE, micros
from kbms.providers import REGISTRY
from kbms.settings import Settings
from kbms.storage import parse_database_url, reading_engine
from kbms.storage.migrate import current_revision, head_revision, is_known

DATABASE_KEY = "kbms.database"  # where a command leaves its Database in the click context, for the failure's message

err = Console(stderr=True)
out = Console()


def say(message: str, *, console: Console = err) -> None:
    """A line as it is: no Rich markup (``kbms[parquet]`` is text, as are file names and user input)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", metavar="URL", help="Overrides KBMS_DATABASE_URL", show_default=False),
]


def settings_of(**overrides: object) -> Settings:
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


def database_of(ctx: typer.Context, settings: Settings, flag: str | None, *, create: bool = False) -> Database:
    """The database of this command. Only ``kbms migrate`` (``create``) may find no SQLite file there."""
    try:
        url = parse_database_url(settings.database_url)
    except ValueError as exc:
        raise Failure(f"{'--database-url' if flag is not None else 'KBMS_DATABASE_URL'}: {exc}") from None
    database = Database(url, named_by_flag=flag is not None)
    ctx.meta[DATABASE_KEY] = database
    if not create and database.file is not None and not database.file.exists():
        raise Failure(f"no database at {database.file.absolute()}: run {database.migrate_command} first")
    return database


def require_current_schema(database: Database) -> None:
    """Refuse a database whose schema is not this kbms's. Reads only: no write lock, no file created."""
    engine = reading_engine(database.url)  # as parsed: rendered again, a path that is not UTF-8 would not encode
    try:
        found = current_revision(engine)
    finally:
        engine.dispose()
    needed = head_revision()
    refuse_a_newer_schema(database, found)
    if found != needed:
        raise Failure(
            f"the database {database.shown} is not migrated (its schema is at {found or 'empty'}, this kbms needs "
            f"{needed}): run {database.migrate_command}"
        )


def refuse_a_newer_schema(database: Database, found: str | None) -> None:
    if found is not None and not is_known(found):
        raise Failure(
            f"the schema of the database {database.shown} is at {found}, a revision of a newer kbms (this one goes "
            f"up to {head_revision()}): run that kbms, or this one against another database"
        )


def text_option(flag: str, value: str | None) -> None:
    """Refuse text kbms never stores (``kbms.model.UNSTORABLE``: bytes that are not UTF-8, NUL), as the API does:
    no stored value could match it, and a driver could not even send it."""
    if value is not None and UNSTORABLE.search(value) is not None:
        raise Failure(
            f"{flag} '{printable(value)}' is not UTF-8 text (or holds NUL), which kbms never stores: "
            f"pass {flag} in UTF-8"
        )


def micros_of(value: datetime | None) -> int | None:
    """A command-line time as stored micros; a time without a zone is taken as UTC."""
    return None if value is None else micros(value if value.tzinfo else value.replace(tzinfo=UTC))


def counting_progress() -> Progress:
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


def known_provider(provider: str | None) -> None:
    text_option("--provider", provider)
    if provider is not None and provider not in REGISTRY:
        raise Failure(f"Unknown provider {provider!r} (known: {', '.join(REGISTRY)}): pass --provider with one of them")
