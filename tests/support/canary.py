"""The log canary: fake personal data and secrets seeded into the suite's inputs, and a watch that fails the whole
run if any of them reaches a log line or an error body.

Every canary carries ``TAG``, a string found nowhere else, so one search finds them all, whatever field they went
through. It is fixed rather than drawn for each session: payloads are identified by their hash, and a random tag
made hash-ordered results (which of two versions of a conversation in a batch comes first) differ between runs.

Where they are seeded: ``tests/support/helpers.py`` (authors' emails and part bodies of built payloads), the webhook
secrets of the webhook tests, the ``Authorization: Bearer`` header of the ``client`` fixture, and the error paths of
``tests/system/test_canary.py``.

What is watched, for the whole session (``CanaryWatch``, registered by ``tests/conftest.py``):
- every log line of the test process, all loggers at debug, exactly as kbms renders it: logging is configured by
  ``kbms.logs.configure_logging("debug")`` with this watch as its output stream (re-done after any test that
  reconfigures logging);
- what tests left on stderr, and the log files of the servers they started (``LiveServer.stop``);
- every error body an app answers through a ``TestClient``: bodies with a 4xx or 5xx status, and the ``error``
  objects inside 2xx JSON (a batch's rejected lines).

At the end, any sighting fails the run (exit status 1) and the terminal summary says where.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO, cast

import pytest
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kbms.logs import configure_logging

TAG = "cnry0c4e9f1b7a2d"
EMAIL = f"canary.{TAG}@example.invalid"
NAME = f"Canary {TAG}"
TEXT = f"my card number is canary-{TAG}"
TOKEN = f"kbms_canary_token_{TAG}"
SHOWN = 20  # sightings printed in the summary


def secret(purpose: str) -> str:
    """A webhook signing secret for ``purpose``, carrying the canary."""
    return f"canary-{purpose}-secret-{TAG}"


class CanaryWatch:
    """Counts what it checks, remembers where a canary was seen."""

    def __init__(self) -> None:
        self.sightings: list[str] = []
        self.lines = 0
        self.bodies = 0
        self.output = _Output(self)
        self._patch = pytest.MonkeyPatch()

    def check(self, where: str, text: str) -> None:
        if TAG in text:
            self.sightings.append(f"{where}: {text.strip()[:300]}")

    def check_file(self, path: Path) -> None:
        if path.exists():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                self.lines += 1
                self.check(f"{path.name}:{number}", line)

    def install_logging(self, output: _Output | None = None) -> None:
        configure_logging("debug", stream=cast(TextIO, output or self.output))

    def logging_installed(self) -> bool:
        return any(isinstance(getattr(h, "stream", None), _Output) for h in logging.getLogger().handlers)

    @contextlib.contextmanager
    def copying_to(self, buffer: io.StringIO) -> Iterator[None]:
        """Lines logged meanwhile are also written to ``buffer`` (for tests that read them)."""
        self.install_logging(_Output(self, copy_to=buffer))
        try:
            yield
        finally:
            self.install_logging()

    # pytest hooks

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.install_logging()
        original = TestClient.__init__

        def watched_init(client: TestClient, app: ASGIApp, *args: Any, **kwargs: Any) -> None:
            original(client, _ErrorBodies(app, self), *args, **kwargs)

        self._patch.setattr(TestClient, "__init__", watched_init)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Lines a test's code wrote to stderr (pytest captured them), e.g. after it configured logging itself; not
        # its captured log records, which pytest formats its own way, messages and all, unlike kbms.
        if report.capstderr:
            self.check(f"stderr of {report.nodeid} ({report.when})", report.capstderr)
        if not self.logging_installed():
            self.install_logging()

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self._patch.undo()
        if self.sightings:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.sightings:
            terminalreporter.section("log canary", red=True, bold=True)
            terminalreporter.write_line(f"{len(self.sightings)} canary sightings (TAG {TAG}):", red=True)
            for sighting in self.sightings[:SHOWN]:
                terminalreporter.write_line(f"  {sighting}")
        else:
            terminalreporter.write_line(
                f"log canary: 0 sightings in {self.lines} log lines and {self.bodies} error bodies", green=True
            )


class _Output(io.TextIOBase):
    """The stream every log line is written to during the session: checked, then dropped."""

    def __init__(self, watch: CanaryWatch, *, copy_to: io.StringIO | None = None) -> None:
        self._watch = watch
        self._copy_to = copy_to

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._watch.lines += text.count("\n")
        self._watch.check("log", text)
        if self._copy_to is not None:
            self._copy_to.write(text)
        return len(text)


class _ErrorBodies:
    """An ASGI wrapper that shows the watch every error body the app sends."""

    def __init__(self, app: ASGIApp, watch: CanaryWatch) -> None:
        self.app = app
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        json_body = False
        chunks: list[bytes] = []

        async def watched(message: Message) -> None:
            nonlocal status, json_body
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers", ()))
                json_body = headers.get(b"content-type", b"").startswith(b"application/json")
            elif message["type"] == "http.response.body" and (status >= 400 or json_body):
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self._check(scope, status, b"".join(chunks))
            await send(message)

        await self.app(scope, receive, watched)

    def _check(self, scope: Scope, status: int, body: bytes) -> None:
        where = f"{status} body of {scope['method']} {scope['path']}"
        text = body.decode(errors="replace")
        if status >= 400:
            self.watch.bodies += 1
            self.watch.check(where, text)
            return
        try:
            document = json.loads(body)
        except ValueError:
            return
        for error in _errors_in(document):
            self.watch.bodies += 1
            self.watch.check(where, json.dumps(error))


def _errors_in(document: Any) -> Iterator[Any]:
    """The error bodies (objects with an ``error_code``) anywhere inside a JSON document."""
    if isinstance(document, dict):
        if "error_code" in document:
            yield document
        for value in document.values():
            yield from _errors_in(value)
    elif isinstance(document, list):
        for value in document:
            yield from _errors_in(value)


WATCH = CanaryWatch()
