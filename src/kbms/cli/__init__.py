"""The ``kbms`` command: serve, migrate, ingest, reprocess, export, sync, keys.

Failures become exit codes here, and only here: a command raises ``kbms.cli.exits.Failure`` (or lets a database or
input error through), and ``Group`` tells it in one line, with the exit code ``kbms.cli.exits`` gives it.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from kbms import __version__
from kbms.cli import admin, export, ingest, reprocess, serve, sync
from kbms.cli.common import DATABASE_KEY, out, say
from kbms.cli.exits import USAGE, Failure, explain, without_secrets


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
    """The exit of a failure, told in one line (see ``kbms.cli.exits``); ``exc`` itself again for a bug."""
    failure = _usage_failure(exc) or explain(exc, ctx.meta.get(DATABASE_KEY) if ctx is not None else None)
    if failure is None:
        raise exc  # a bug: its traceback is the report
    # One line, whatever a file name holds; no password, wherever the text came from (a misplaced URL, a driver).
    say(f"kbms: {without_secrets(' '.join(failure.message.splitlines()))}")
    if _debugging(ctx):
        traceback.print_exception(exc, file=sys.stderr)
    return typer.Exit(failure.code)


def _without_placeholder(option: Any) -> Any:
    """The ``--help`` flag, shown without the ``<bool>`` placeholder Typer gives flags."""
    if option is not None:
        option.metavar = ""
    return option


class _Argument(TyperArgument):
    """An argument shown as its metavar alone (``FILE``), as options are: Typer adds the type (``FILE <file>``)
    and braces in the usage line (``{FILE}``)."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:  # type: ignore[override]
        return None

    def _usage_display_name(self) -> str:
        return self.display_name_raw


class Command(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is TyperArgument:  # Typer makes them itself, with no way to name another class
                param.__class__ = _Argument

    def get_help_option(self, ctx: typer.Context) -> TyperOption | None:  # type: ignore[override]
        return _without_placeholder(super().get_help_option(ctx))  # type: ignore[no-any-return]

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except typer.TyperException as exc:
            # The parser's own errors (an option without its value) carry no context: give them this command's,
            # so that the message points to this command's --help, not kbms's.
            if getattr(exc, "exit_code", None) == USAGE and getattr(exc, "ctx", ...) is None:
                exc.ctx = self.context_class(self, info_name=info_name, parent=parent)  # type: ignore[attr-defined]
            raise


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


def _print_version(value: bool) -> None:
    if value:
        say(f"kbms {__version__}", console=out)
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


for run in (serve.serve, admin.migrate, ingest.ingest, reprocess.reprocess, export.export, sync.sync):
    app.command(cls=Command)(run)
keys_app = typer.Typer(cls=Group, no_args_is_help=True, help="API keys.")
keys_app.command("create", cls=Command)(admin.create_key)
app.add_typer(keys_app, name="keys")


def main() -> None:
    app(prog_name="kbms")  # also under python -m kbms
