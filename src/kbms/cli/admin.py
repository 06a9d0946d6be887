"""``kbms migrate`` and ``kbms keys create``: the schema and the API keys."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError

from kbms.auth import SCOPES, key_config, new_key
from kbms.cli.common import DatabaseUrl, database_of, err, out, refuse_a_newer_schema, say, settings_of
from kbms.cli.exits import Failure
from kbms.storage import admin_engine
from kbms.storage.migrate import current_revision, upgrade


def migrate(ctx: typer.Context, database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the database schema (safe to run again)."""
    settings = settings_of(database_url=database_url)
    database = database_of(ctx, settings, database_url, create=True)
    engine = admin_engine(settings.database_url, lock_wait=settings.db_timeout)
    try:
        before = current_revision(engine)
        refuse_a_newer_schema(database, before)
        upgrade(engine)
        after = current_revision(engine)
    finally:
        engine.dispose()
    if before == after:
        say(f"Database {database.shown} already at revision {after}.", console=out)
    else:
        say(f"Database {database.shown} migrated from {before or 'empty'} to {after}.", console=out)


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
    say(token, console=out)
    err.print("Add this entry to the JSON list in KBMS_API_KEYS (or KBMS_API_KEYS_FILE):")
    say(entry, console=out)
