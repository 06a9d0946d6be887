from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import make_url

from kbms.api import create_app
from kbms.settings import Settings
from kbms.storage import Store, admin_engine, open_store
from kbms.storage.migrate import upgrade
from tests.support import canary

if TYPE_CHECKING:
    from tests.support.forkserver import ForkServer

POSTGRES_URL = os.environ.get("KBMS_TEST_POSTGRES_URL", "")
REQUIRE_POSTGRES = os.environ.get("KBMS_REQUIRE_POSTGRES") == "1"
NO_POSTGRES = "skipped: no PostgreSQL (set KBMS_TEST_POSTGRES_URL to run the PostgreSQL half of the suite)"
# The browser tests (tests/browser) drive Debian's Chromium; `make test` installs it when it can.
CHROMIUM = Path(os.environ.get("KBMS_CHROMIUM") or "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("KBMS_REQUIRE_BROWSER") == "1"
NO_BROWSER = f"skipped: no Chromium at {CHROMIUM} (as root: apt-get install chromium; `make test` does it)"
ENGINES = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]


def migrate(url: str) -> str:
    engine = admin_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return url


def migrated_sqlite_url(directory: Path) -> str:
    return migrate(f"sqlite:///{directory / 'kbms.db'}")


def require_postgres() -> str:
    if not POSTGRES_URL:
        if REQUIRE_POSTGRES:
            pytest.fail("KBMS_REQUIRE_POSTGRES=1 but KBMS_TEST_POSTGRES_URL is not set")
        pytest.skip(NO_POSTGRES)
    return POSTGRES_URL


def require_browser() -> Path:
    if not CHROMIUM.is_file():
        if REQUIRE_BROWSER:
            pytest.fail(f"KBMS_REQUIRE_BROWSER=1 but there is no Chromium at {CHROMIUM}")
        pytest.skip(NO_BROWSER)
    return CHROMIUM


@contextmanager
def postgres_schema(*, migrated: bool = True) -> Iterator[str]:
    """A fresh schema in the test database, selected by ``search_path`` in the URL it yields; dropped after."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = admin_engine(require_postgres())
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={name}"})
        text = url.render_as_string(hide_password=False)
        yield migrate(text) if migrated else text
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        admin.dispose()


@contextmanager
def engine_url(engine: str, directory: Path, *, migrated: bool = True) -> Iterator[str]:
    if engine == "postgres":
        with postgres_schema(migrated=migrated) as url:
            yield url
    else:
        url = f"sqlite:///{directory / 'kbms.db'}"
        yield migrate(url) if migrated else url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database on each engine."""
    with engine_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=ENGINES)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database on each engine that no migration has touched."""
    with engine_url(request.param, tmp_path, migrated=False) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return migrated_sqlite_url(tmp_path)


def pytest_report_header() -> list[str]:
    return [
        f"PostgreSQL: {make_url(POSTGRES_URL).render_as_string()}" if POSTGRES_URL else NO_POSTGRES,
        f"Chromium: {CHROMIUM}" if CHROMIUM.is_file() else NO_BROWSER,
    ]


def _skipped(reporter: object, marker: str) -> int:
    return sum(1 for r in getattr(reporter, "stats", {}).get("skipped", []) if marker in r.keywords)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    if skipped := _skipped(terminalreporter, "postgres"):
        terminalreporter.write_line(f"{NO_POSTGRES}: {skipped} PostgreSQL tests did not run", yellow=True, bold=True)
    if skipped := _skipped(terminalreporter, "browser"):
        terminalreporter.write_line(f"{NO_BROWSER}: {skipped} browser tests did not run", yellow=True, bold=True)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(canary.WATCH, "kbms-log-canary")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    required = ("postgres", REQUIRE_POSTGRES), ("browser", REQUIRE_BROWSER)
    if any(require and _skipped(reporter, marker) for marker, require in required):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    # A bearer token that must never reach a log line (tests/support/canary.py); ignored while no API keys are
    # configured.
    headers = {"Authorization": f"Bearer {canary.TOKEN}"}
    with TestClient(create_app(settings), headers=headers) as test_client:
        yield test_client


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = open_store(Settings(database_url=database_url))
    try:
        yield opened
    finally:
        await opened.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    """A real ``kbms serve`` process."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            canary.WATCH.check_file(self.log)


def start_server(
    database_url: str, log: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> LiveServer:
    port = free_port()
    with log.open("ab") as output:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "kbms", "serve", "--port", str(port), "--database-url", database_url, *args],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KBMS_LOG_LEVEL": "debug", **(env or {})},  # every line, for the log canary
        )
    server = LiveServer(url=f"http://127.0.0.1:{port}", process=process, log=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kbms serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx2.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx2.TransportError:
            time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"kbms serve did not become healthy:\n{log.read_text()}")


@pytest.fixture
def live_server(database_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    server = start_server(database_url, tmp_path / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fork_server() -> Iterator[ForkServer]:
    """Starts ``kbms serve`` processes in a fraction of a second each (see tests/support/forkserver.py)."""
    from tests.support.forkserver import ForkServer

    server = ForkServer()
    try:
        yield server
    finally:
        server.close()
