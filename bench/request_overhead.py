"""CPU microseconds per request, in-process: the cost of kbms's per-request layers, without a network in the way.

Drives the ASGI app directly (no server, no client library) on a fresh SQLite database, with logging configured
as ``kbms serve`` configures it (JSON lines on stderr: run with ``2>/dev/null`` or a file). Measures process CPU
time, so fsync waits do not count. Each scenario is measured for the app as built and for the same app without its
telemetry middleware, in alternation (the machine's other load hits both alike). To compare two trees, run it from
each (``PYTHONPATH=<tree>/src``), alternately:

    for i in 1 2 3; do
        PYTHONPATH=/path/to/before/src .venv/bin/python bench/request_overhead.py 2>/dev/null
        .venv/bin/python bench/request_overhead.py 2>/dev/null
    done
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kbms.api import create_app
from kbms.logs import configure_logging
from kbms.settings import Settings
from kbms.storage import admin_engine
from kbms.storage.migrate import upgrade

Message = dict[str, Any]


def payload(number: int) -> bytes:
    return json.dumps(
        {
            "type": "conversation",
            "id": f"bench-{number}",
            "created_at": 1_700_000_000,
            "updated_at": 1_700_000_000 + number % 1_000_000,
            "source": {
                "type": "conversation",
                "id": f"bench-{number}-m0",
                "body": "<p>My invoice is wrong</p>",
                "author": {"type": "user", "id": "u1", "name": "Ana", "email": "ana@example.com"},
            },
            "conversation_parts": {
                "type": "conversation_part.list",
                "conversation_parts": [
                    {
                        "type": "conversation_part",
                        "id": f"bench-{number}-p1",
                        "part_type": "comment",
                        "body": "<p>Sorry! Fixed.</p>",
                        "created_at": 1_700_000_100,
                        "author": {"type": "admin", "id": "a1", "name": "Ben"},
                    }
                ],
            },
        }
    ).encode()


async def call(app: Any, method: str, path: str, body: bytes = b"") -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    delivered = False
    status = 0

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def scenario(app: Any, name: str, n: int) -> float:
    """CPU microseconds per request of one scenario."""
    redelivery = payload(0)
    await call(app, "POST", "/integrations/intercom/conversations", redelivery)
    offset = int(time.time() * 1000)  # fresh conversation ids on each run of the "created" scenario

    async def one(i: int) -> int:
        if name == "health":
            return await call(app, "GET", "/health")
        if name == "redelivery":
            return await call(app, "POST", "/integrations/intercom/conversations", redelivery)
        return await call(app, "POST", "/integrations/intercom/conversations", payload(offset + i))

    for i in range(200):  # warm-up
        await one(-i - 1)
    start = time.process_time()
    statuses = [await one(i) for i in range(n)]
    spent = time.process_time() - start
    assert all(200 <= s < 300 for s in statuses), set(statuses)
    return spent / n * 1e6


async def run(n: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median CPU us per request of each scenario, for the app as built and, when it has one, for the same app
    without its telemetry middleware (request id, access line, HTTP metrics), measured in alternation."""
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{Path(directory) / 'bench.db'}"
        engine = admin_engine(url)
        upgrade(engine)
        engine.dispose()
        apps = {"kbms": create_app(Settings(database_url=url))}
        middleware = apps["kbms"].user_middleware
        if any(m.cls.__name__ == "RequestTelemetry" for m in middleware):  # type: ignore[attr-defined]
            bare = apps["without telemetry"] = create_app(Settings(database_url=url))
            bare.user_middleware = [m for m in middleware if m.cls.__name__ != "RequestTelemetry"]  # type: ignore[attr-defined]
        results: dict[str, dict[str, list[float]]] = {
            name: {"health": [], "redelivery": [], "created": []} for name in apps
        }
        async with contextlib.AsyncExitStack() as stack:
            for app in apps.values():
                await stack.enter_async_context(app.router.lifespan_context(app))
            for round_number in range(repeats):
                order = list(apps.items()) if round_number % 2 == 0 else list(reversed(apps.items()))
                for name, app in order:
                    for scenario_name in results[name]:
                        results[name][scenario_name].append(await scenario(app, scenario_name, n))
        return {
            name: {scenario_name: statistics.median(values) for scenario_name, values in by_scenario.items()}
            for name, by_scenario in results.items()
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="requests per scenario and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    configure_logging(args.log_level)
    results = asyncio.run(run(args.n, args.repeats))
    print(json.dumps({app: {name: round(us, 1) for name, us in by.items()} for app, by in results.items()}))


if __name__ == "__main__":
    main()
