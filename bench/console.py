"""The console's pages at scale: how fast each answers with a million conversations stored (issue 16's target: p50
under 100 ms).

The database is built as ``bench/scale.py`` builds its large one (``kbms ingest`` of the harness corpus; about an hour
for a million, kept under ``--keep`` and reused), migrated to the current schema, and served by one ``kbms serve``
process with an admin key and a configured source (its API a closed local port: the Sources page has a row, whose
passes fail without leaving the machine). A few refused payloads are pushed so that Rejects lists some. One client
signs in once, then, page by page, warms it once and times ``--requests`` sequential GETs of its full HTML:

- overview (``/console``), the conversations list's first page, a filtered list (state and tag), a search (a single
  word of the corpus, a different one each time), a conversation page (each of the first page's conversations in
  turn), rejects, sources;
- the overview's first view by the process, which counts the whole day's deliveries for its chart (later views
  count only the minutes since the last final one: ``kbms/api/console/tally.py``);
- the overview again, each time after its kept workspace counts have aged (``COUNTS_TTL``): the view shows them
  while they are counted again in the background, so this is what a page left open and reloaded costs.

Writes ``bench/out/console.json`` and prints a table. Not part of the test suite (speed is measured, not asserted).

    python bench/console.py [--conversations 1000000] [--requests 50] [--keep DIR] [--port 8766]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import cycle
from pathlib import Path
from typing import Any

import httpx2
from selectolax.lexbor import LexborHTMLParser as HTMLParser

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is no package: scale.py is found beside this file
import scale
from kbms.api.console.tally import COUNTS_TTL
from kbms.auth import digest, new_key

OUT = scale.OUT
KBMS = scale.KBMS
TARGET_P50_MS = 100
REFUSED = 20
# The Sources page needs a configured source; its API is a closed local port (nothing leaves the machine).
SOURCE = {"provider": "intercom", "workspace": "bench", "token": "bench-token", "base_url": "http://127.0.0.1:9"}


def sign_in(client: httpx2.Client, key: str) -> None:
    form = HTMLParser(client.get("/console/login").text).css_first('input[name="csrf"]')
    csrf = form.attributes.get("value") if form is not None else None
    answer = client.post("/console/login", data={"key": key, "csrf": csrf or ""})
    if answer.status_code != 303:
        sys.exit(f"sign-in answered {answer.status_code}: {answer.text[:500]}")


def refuse_some(client: httpx2.Client, key: str) -> None:
    """Payloads today's mapper refuses (a part without an id): kept in the ledger as rejected."""
    for n in range(REFUSED):
        payload = {
            "type": "conversation",
            "id": f"bench-refused-{n}",
            "created_at": 1_700_000_000,
            "updated_at": 1_700_000_000,
            "conversation_parts": {"type": "conversation_part.list", "conversation_parts": [{"body": "<p>x</p>"}]},
        }
        answer = client.post(
            "/integrations/intercom/conversations",
            content=json.dumps(payload),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        if answer.status_code != 422:
            sys.exit(f"a refused payload answered {answer.status_code}: {answer.text[:500]}")


def conversation_paths(client: httpx2.Client) -> list[str]:
    tree = HTMLParser(client.get("/console/conversations").text)
    paths = [a.attributes.get("href") or "" for a in tree.css("#conversations a")]
    found = list(dict.fromkeys(p for p in paths if p.startswith("/console/conversations/")))
    if not found:
        sys.exit("the conversations page links to no conversation")
    return found


def timed(client: httpx2.Client, paths: Callable[[], str], requests: int) -> dict[str, Any]:
    client.get(paths())  # warm: the first request of a page pays for its templates and the page cache
    times, rows = [], []
    for _ in range(requests):
        path = paths()
        started = time.perf_counter()
        answer = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        if answer.status_code != 200 or "<html" not in answer.text:
            sys.exit(f"GET {path} answered {answer.status_code}: {answer.text[:500]}")
        rows.append(len(HTMLParser(answer.text).css("main table tbody tr")))
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(scale.percentile(times, 0.95), 2),
        "max_ms": round(max(times), 2),
        "requests": requests,
        "table_rows_min": min(rows),  # that the page showed something: an empty result is no measurement
    }


def measure(server: scale.Server, key: str, requests: int, fresh: int) -> dict[str, Any]:
    with httpx2.Client(base_url=server.base, timeout=120) as client:
        refuse_some(client, key)
        sign_in(client, key)
        conversations = cycle(conversation_paths(client))
        words = cycle(scale.WORDS)
        pages: dict[str, Callable[[], str]] = {
            "overview": lambda: "/console",
            "conversations": lambda: "/console/conversations",
            "filtered list": lambda: "/console/conversations?state=snoozed&tag=billing",
            "search": lambda: f"/console/conversations?q={next(words)}",
            "conversation": lambda: next(conversations),
            "rejects": lambda: "/console/rejects",
            "sources": lambda: "/console/sources",
        }
        results = {}
        started = time.perf_counter()
        first = client.get("/console")
        if first.status_code != 200:
            sys.exit(f"GET /console answered {first.status_code}: {first.text[:500]}")
        ms = round((time.perf_counter() - started) * 1000, 2)
        rows = len(HTMLParser(first.text).css("main table tbody tr"))
        # One request (a process's first view): its p50 is that one figure.
        one = {"p50_ms": ms, "p95_ms": ms, "max_ms": ms, "requests": 1, "table_rows_min": rows}
        results["overview, first view"] = one
        print(f"overview, first view: {results['overview, first view']}", flush=True)
        for name, paths in pages.items():
            results[name] = timed(client, paths, requests)
            print(f"{name}: {results[name]}", flush=True)
        results["overview, counts aged"] = fresh_overview(client, samples=fresh)
        print(f"overview, counts aged: {results['overview, counts aged']}", flush=True)
        return results


def fresh_overview(client: httpx2.Client, *, samples: int) -> dict[str, Any]:
    """The overview each time after its kept workspace counts aged (``COUNTS_TTL``): one request per period."""
    times, rows = [], []
    for _ in range(samples):
        time.sleep(COUNTS_TTL + 1)
        started = time.perf_counter()
        answer = client.get("/console")
        times.append((time.perf_counter() - started) * 1000)
        if answer.status_code != 200:
            sys.exit(f"GET /console answered {answer.status_code}: {answer.text[:500]}")
        rows.append(len(HTMLParser(answer.text).css("main table tbody tr")))
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(scale.percentile(times, 0.95), 2),
        "max_ms": round(max(times), 2),
        "requests": samples,
        "table_rows_min": min(rows),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    OUT.mkdir(exist_ok=True)
    directory = Path(args.keep)
    directory.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{directory / f'console-{args.conversations}.db'}"
    built = None
    if scale.stored(url) < args.conversations:  # a kept database is reused: no corpus needed
        built = scale.build(url, scale.corpus(args.conversations), args.conversations, reuse=False)
    # A database built by an older kbms gets the console's indexes (and any later migration) here.
    subprocess.run([str(KBMS), "migrate", "--database-url", url], check=True, capture_output=True)  # noqa: S603
    key = new_key()
    keys = [{"name": "bench-admin", "sha256": digest(key), "scopes": ["admin"]}]
    env = {"KBMS_API_KEYS": json.dumps(keys), "KBMS_SOURCES": json.dumps([SOURCE]), "KBMS_SYNC_INTERVAL": "86400"}
    server = scale.Server(url, args.port, directory / "server.log", env, start_timeout=120)
    try:
        pages = measure(server, key, args.requests, args.fresh)
    finally:
        server.stop()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "engine": "sqlite",
        "stored": scale.stored(url),
        "ingest_seconds": built,
        "pages": pages,
        "target_p50_ms": TARGET_P50_MS,
        "target_met": all(page["p50_ms"] < TARGET_P50_MS for page in pages.values()),
    }
    (OUT / "console.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Console pages with {results['stored']:,} conversations stored (SQLite, one `kbms serve` process, "
        f"sequential requests from one signed-in client; {results['date']}):",
        "",
        "| page | p50 ms | p95 ms | max ms | table rows |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, page in results["pages"].items():
        lines.append(f"| {name} | {page['p50_ms']} | {page['p95_ms']} | {page['max_ms']} | {page['table_rows_min']} |")
    lines.append("")
    missed = [name for name, page in results["pages"].items() if page["p50_ms"] >= results["target_p50_ms"]]
    verdict = "yes" if not missed else "NO: " + ", ".join(missed)
    lines.append(f"p50 under {results['target_p50_ms']} ms on every page: {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--fresh", type=int, default=8, help="overviews timed after their kept workspace counts aged")
    parser.add_argument("--keep", default=str(OUT / "console"), help="where the database is built and kept")
    parser.add_argument("--port", type=int, default=8766)
    print(table(run(parser.parse_args())))


if __name__ == "__main__":
    main()
