"""Backfill speed of a sync pass: N conversations from the fake Intercom of the test suite, with no rate limit.

The fake runs in the same process as kbms (its ASGI app behind ``httpx2.ASGITransport``): no network, and the
fake's own CPU counts against the figure. kbms's side is the real one: the Intercom client (search pages of 150,
one retrieve per conversation), the queue on the database, 8 fetches in flight, each stored as a push is.

    .venv/bin/python bench/sync_backfill.py [--n 10000] [--database-url URL]

Prints one JSON line: conversations, seconds, conversations per second, requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fake lives in the test suite

from tests.providers.intercom.fake import FakeIntercom  # noqa: E402

from kbms.providers import get_provider  # noqa: E402
from kbms.providers.pull import SourceConfig  # noqa: E402
from kbms.settings import Settings  # noqa: E402
from kbms.storage import admin_engine, open_store  # noqa: E402
from kbms.storage.migrate import upgrade  # noqa: E402
from kbms.sync.runner import Pass  # noqa: E402


async def backfill(database_url: str, n: int) -> dict[str, float]:
    fake = FakeIntercom(limit=10_000_000)
    for i in range(n):
        fake.add(str(100_000 + i), updated_at=1_650_000_000 + i, parts=1 + i % 5)
    source = SourceConfig("intercom", fake.app_id, fake.token, max_requests_per_minute=10_000_000)
    provider = get_provider("intercom")
    assert provider.puller is not None
    client = provider.puller.client(source, transport=fake.transport())
    store = open_store(Settings(database_url=database_url))
    try:
        started = time.perf_counter()
        report = await Pass(store, provider, source, client).run()
        seconds = time.perf_counter() - started
    finally:
        await client.aclose()
        await store.close()
    assert report.created == n, report
    return {
        "conversations": n,
        "seconds": round(seconds, 2),
        "per_second": round(n / seconds, 1),
        "requests": client.stats.requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        url = args.database_url or f"sqlite:///{directory}/kbms.db"
        engine = admin_engine(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        print(json.dumps(asyncio.run(backfill(url, args.n))))


if __name__ == "__main__":
    main()
