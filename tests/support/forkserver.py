"""A fork server for test servers: it imports kbms once, then forks one ``kbms serve`` process per request.

Why: starting ``python -m kbms serve`` costs 2-4 s on a loaded 2-core machine, nearly all of it imports, and the
crash test starts 40 servers. A forked child is a process of its own running the CLI's ``serve`` (the same code
as ``kbms serve``); SIGKILL ends it as abruptly as any other process, and the database sees exactly that.

The fork server itself holds no database connection, no thread and no socket when it forks (kbms builds nothing
at import time). Protocol, one JSON object per line: the test writes ``{"args": [...], "env": {...}, "log": path}``
on its stdin and reads ``{"pid": n}`` back. Children are reaped by the kernel (SIGCHLD ignored), so a killed
child's pid disappears as soon as it is dead.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import uvicorn

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ForkedServer:
    """A ``kbms serve`` child of the fork server."""

    url: str
    pid: int
    log: Path

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self, sig: int = signal.SIGKILL, *, timeout: float = 15) -> None:
        """Send ``sig`` and wait until the process is gone (escalating to SIGKILL after ``timeout``)."""
        if not self.alive():
            return
        os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.01)


class ForkServer:
    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )

    def spawn(self, database_url: str, log: Path, *, env: dict[str, str] | None = None) -> ForkedServer:
        """A healthy ``kbms serve --database-url database_url`` on a free port, its output appended to ``log``."""
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        port = free_port()
        request = {"args": ["--port", str(port), "--database-url", database_url], "env": env or {}, "log": str(log)}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        server = ForkedServer(f"http://127.0.0.1:{port}", json.loads(self._process.stdout.readline())["pid"], log)
        deadline = time.monotonic() + 30
        with httpx2.Client(base_url=server.url, timeout=1) as http:  # one client: each costs an SSL context
            while time.monotonic() < deadline:
                if not server.alive():
                    raise RuntimeError(f"kbms serve exited:\n{log.read_text()}")
                try:
                    if http.get("/health").status_code == 200:
                        return server
                except httpx2.TransportError:
                    time.sleep(0.01)
        server.kill()
        raise RuntimeError(f"kbms serve did not become healthy:\n{log.read_text()}")

    def close(self) -> None:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.close()  # the fork server ends when its input does
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()


def _serve(request: dict[str, Any]) -> None:
    """In the child: become ``kbms serve`` with the requested arguments, output and environment."""
    from kbms.cli import main

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code: Any = 1
    try:
        output = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.update(request["env"])
        sys.argv = ["kbms", "serve", *request["args"]]
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    raise NotImplementedError


def _main() -> None:
    # What a child needs, imported once, here: that is the time saved.
    for module in ("kbms.api", "kbms.cli", "uvicorn.loops.auto"):
        importlib.import_module(module)
    # ...and what uvicorn imports as it starts (its HTTP, WebSocket and lifespan protocols).
    uvicorn.Config(app=_no_app, log_config=None).load()
    # As pre-forking servers do: the children's garbage collections then skip what was imported here, instead of
    # walking (and so copying) the whole inherited heap (kbms's startup collects once: 0.3-0.5 s per child here).
    gc.collect()
    gc.freeze()

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _serve(request)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _main()
