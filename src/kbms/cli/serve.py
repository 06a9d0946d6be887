"""``kbms serve``: the HTTP API, on an address checked before anything starts."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import secrets
import socket
import sys
from typing import Annotated

import typer

from kbms.auth import Keyring, KeyringError
from kbms.cli.common import DatabaseUrl, database_of, require_current_schema, settings_of
from kbms.cli.exits import Failure
from kbms.sync.sources import SourcesError, sources_of

log = logging.getLogger(__name__)


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

    settings = settings_of(host=host, port=port, database_url=database_url, workers=workers)
    configure_logging(settings.log_level)
    try:
        keyring = Keyring.configured(settings.api_keys, settings.api_keys_file)
    except KeyringError as exc:
        raise Failure(str(exc)) from None
    try:
        sources_of(settings)  # unusable sources stop the start here, in one line (create_app would raise)
    except SourcesError as exc:
        raise Failure(str(exc)) from None
    if not keyring and not _is_loopback(settings.host) and not insecure:
        raise Failure(
            f"no API keys are configured, so anyone who reaches {settings.host} could read every conversation: "
            "configure keys (KBMS_API_KEYS, see kbms keys create), bind to 127.0.0.1, or pass --insecure on a "
            "network you trust"
        )
    require_current_schema(database_of(ctx, settings, database_url))
    # Bound here, before the app starts: uvicorn binds after the application's startup, and then only logs a port
    # in use, after "Application startup complete".
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as exc:
        raise Failure(_cannot_listen(settings.host, settings.port, exc)) from None
    if not settings.console_secret:
        # One secret for every worker, so that a console session signed by one is read by the others.
        settings = settings.model_copy(update={"console_secret": secrets.token_urlsafe(32)})
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
