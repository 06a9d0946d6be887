"""CPU per ingested conversation, stage by stage: the README's "Where the time goes" table.

Drives ``POST /integrations/intercom/conversations`` through the ASGI app in-process (no server, no network),
32 requests at a time as the benchmark's wrk does, on a fresh SQLite database, and times each stage in place:
parsing (validation and mapping), preparing the rows, the SQL statements, the end-of-transaction writes (search
documents and feed), the commit (on its own thread, with that thread's CPU clock) and the ledger lookup. The rest
of the process's CPU time is everything else: the framework, the middleware, the response, the group commit.

    .venv/bin/python bench/ingest_profile.py [--n 3000]

The corpus comes from the harness's generator (seed 7, as ``make bench``). The first 200 requests warm up.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kbms.api import create_app
from kbms.providers.intercom import IntercomProvider
from kbms.settings import Settings
from kbms.storage import admin_engine, reads, state, writes
from kbms.storage.migrate import upgrade
from kbms.storage.sqlite import store as sqlite
from request_overhead import call  # the in-process ASGI request of bench/request_overhead.py

HARNESS = Path(__file__).parent / "harness"
WARM_UP = 200
CONCURRENCY = 32
PATH = "/integrations/intercom/conversations"

spent: Counter[str] = Counter()


def timed(owner: Any, name: str, stage: str, clock: Callable[[], float] = time.process_time) -> None:
    """Replace ``owner.name`` by a wrapper that adds its CPU time to ``spent[stage]``."""
    function = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return function(*args, **kwargs)
        finally:
            spent[stage] += clock() - started

    setattr(owner, name, wrapper)


def instrument() -> None:
    timed(IntercomProvider, "parse_push", "parse: validate and map")
    timed(state, "prepare", "prepare: state, read model, rows, search words")
    timed(writes, "apply_delivery", "SQL statements")
    timed(sqlite, "flush_changes", "SQL at the end: search documents, feed")
    timed(sqlite.SqliteStore, "_commit", "commit (its thread's CPU)", time.thread_time)
    timed(reads, "find_delivery", "ledger lookup")


async def run(app: Any, bodies: list[bytes]) -> tuple[float, int]:
    """CPU seconds of the process for everything after the warm-up, and how many requests that was."""
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(body: bytes) -> None:
        async with slots:
            status = await call(app, "POST", PATH, body)
            if status != 201:
                raise SystemExit(f"expected 201 Created, got {status}")

    async with app.router.lifespan_context(app):
        await asyncio.gather(*(one(body) for body in bodies[:WARM_UP]))
        spent.clear()
        started = time.process_time()
        await asyncio.gather(*(one(body) for body in bodies[WARM_UP:]))
        return time.process_time() - started, len(bodies) - WARM_UP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="requests, the first 200 of them to warm up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.ndjson"
        generate = [sys.executable, str(HARNESS / "corpus.py"), "--n", str(args.n), "--seed", "7", "--out", str(corpus)]
        subprocess.run(generate, check=True, capture_output=True)  # noqa: S603 (our interpreter, our generator)
        bodies = [line for line in corpus.read_bytes().split(b"\n") if line]
        url = f"sqlite:///{folder}/kbms.db"
        engine = admin_engine(url)
        upgrade(engine)
        engine.dispose()
        logging.disable(logging.CRITICAL)  # the access log is not what is measured here
        instrument()
        total, count = asyncio.run(run(create_app(Settings(database_url=url)), bodies))
    print(f"{count} ingest requests, {CONCURRENCY} at a time, in-process; CPU per request:")
    for stage, seconds in spent.most_common():
        print(f"  {stage:50s} {seconds / count * 1e6:6.0f} us")
    print(f"  {'everything else':50s} {(total - sum(spent.values())) / count * 1e6:6.0f} us")
    print(f"  {'total (the process)':50s} {total / count * 1e6:6.0f} us")


if __name__ == "__main__":
    main()
