"""Reads at scale, on SQLite or PostgreSQL: the consumer endpoints with 10,000 and then 1,000,000 conversations stored.

Two databases are built with ``kbms ingest`` of the harness corpus (its first 10,000 lines; all of it), then each
is served by one ``kbms serve`` process in turn, in alternating rounds, and measured sequentially from one client:

- list: the first page (``limit=50``) and pages reached by following ``next_cursor``, p50 and p95;
- search: single-word queries (``q=<word>``) over words of the corpus, each a few times, p50 and p95;
- export (at the large size): ``GET /internal/exports/conversations.ndjson`` of everything, streamed and counted,
  with the server's resident memory sampled every 20 ms (its peak, VmHWM, too).

Targets (issue 7): list p50 at 1M within 1.5x of the p50 at 10k; single-word search p50 under 50 ms; the export of
everything with server RSS under 200 MB. Writes ``bench/out/scale.json`` (``scale-postgres.json`` on PostgreSQL);
``bench.py`` puts the table in the summary.

    python bench/scale.py [--engine sqlite|postgres] [--large 1000000] [--small 10000] [--rounds 2]
                          [--keep DIR [--reuse]] [--postgres postgresql://postgres@127.0.0.1:5432]

On PostgreSQL (``--engine postgres``) the two databases are made on the ``--postgres`` server,
``kbms_scale_<pid>_small`` and ``_large``, dropped at the end; with ``--keep`` (its DIR then only holds the log and
the corpus head) they are ``kbms_scale_<small>`` and ``kbms_scale_<large>``, named after their sizes and kept, so
that ``--reuse`` finds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3  # only to count what a database holds: the figures are measured through the API
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import psycopg  # only to count what a PostgreSQL database holds and its size

from pgdb import create as create_database  # bench/pgdb.py, next to this file
from pgdb import database_url
from pgdb import drop as drop_databases

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "harness"
OUT = HERE / "out"
PYTHON = Path(sys.executable)
KBMS = PYTHON.parent / "kbms"
# Single words of the corpus's vocabulary (harness/corpus.py): common and rarer ones alike, since every
# conversation is made of the same few hundred words, each of these matches a large share of the corpus.
WORDS = [
    "refund", "invoice", "webhook", "password", "android", "calendar", "warranty", "coupon", "timezone", "backup",
    "export", "dashboard", "login", "shipping", "crash", "subscription", "permission", "attachment", "slow", "thanks",
]  # fmt: skip
ENGINES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
LIST_PAGES = 100  # pages followed through next_cursor
FIRST_PAGE_REPEATS = 100
SEARCH_REPEATS = 5


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def corpus(count: int, *, seed: int = 7, name: str = "corpus") -> Path:
    """The harness generator's corpus of ``count`` conversations, made once and kept in ``bench/out``."""
    path = OUT / f"{name}-{count}.ndjson"
    if not path.exists():
        generate = [str(PYTHON), str(HARNESS / "corpus.py"), "--n", str(count), "--seed", str(seed), "--out", str(path)]
        subprocess.run(generate, check=True)  # noqa: S603 (our own interpreter and generator)
    return path


def head(source: Path, lines: int, target: Path) -> Path:
    with source.open("rb") as read, target.open("wb") as write:
        for number, line in enumerate(read):
            if number == lines:
                break
            write.write(line)
    return target


def ingest(path: Path, url: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([str(KBMS), "ingest", str(path), "--database-url", url], capture_output=True, text=True)  # noqa: S603
    if done.returncode != 0:
        sys.exit(f"kbms ingest failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


class Server:
    """One ``kbms serve`` process on ``url`` (``env``: more ``KBMS_*`` settings), once it answers ``/ready``."""

    def __init__(
        self, url: str, port: int, log: Path, env: dict[str, str] | None = None, *, start_timeout: float = 60
    ) -> None:
        self.base = f"http://127.0.0.1:{port}"
        with log.open("ab") as output:
            self.process = subprocess.Popen(  # noqa: S603
                [str(KBMS), "serve", "--port", str(port), "--database-url", url, "--workers", "1"],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KBMS_LOG_LEVEL": "warning", **(env or {})},
            )
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            try:
                if httpx2.get(f"{self.base}/ready", timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                time.sleep(0.1)
        self.stop()
        sys.exit(f"kbms serve did not start:\n{log.read_text()[-2000:]}")

    def memory_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def timed_get(client: httpx2.Client, path: str, params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    answer = client.get(path, params=params)
    elapsed = (time.perf_counter() - started) * 1000
    if answer.status_code != 200:
        sys.exit(f"GET {path} {params} answered {answer.status_code}: {answer.text[:500]}")
    return elapsed, answer.json()


def measure_reads(server: Server, stored: int) -> dict[str, Any]:
    with httpx2.Client(base_url=server.base, timeout=120) as client:
        # Warm reads: walk the pages once (a fresh process on a cold page cache would measure the disk), then time.
        cursor = None
        for _ in range(LIST_PAGES):
            warm = client.get("/internal/conversations", params={"limit": 50} | ({"cursor": cursor} if cursor else {}))
            cursor = warm.json()["next_cursor"]
            if cursor is None:
                break
        first = [timed_get(client, "/internal/conversations", {"limit": 50})[0] for _ in range(FIRST_PAGE_REPEATS)]
        following, cursor, seen = [], None, 0
        for _ in range(LIST_PAGES):
            params: dict[str, Any] = {"limit": 50} | ({"cursor": cursor} if cursor else {})
            elapsed, page = timed_get(client, "/internal/conversations", params)
            following.append(elapsed)
            seen += len(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        searches, matched = [], []
        for word in WORDS:
            timed_get(client, "/internal/conversations", {"q": word, "limit": 20})
            for _ in range(SEARCH_REPEATS):
                elapsed, page = timed_get(client, "/internal/conversations", {"q": word, "limit": 20})
                searches.append(elapsed)
            matched.append(len(page["items"]))
    pages = first + following
    return {
        "stored": stored,
        "list_p50_ms": round(statistics.median(pages), 2),
        "list_p95_ms": round(percentile(pages, 0.95), 2),
        "first_page_p50_ms": round(statistics.median(first), 2),
        "cursor_pages_p50_ms": round(statistics.median(following), 2),
        "cursor_pages": len(following),
        "search_p50_ms": round(statistics.median(searches), 2),
        "search_p95_ms": round(percentile(searches, 0.95), 2),
        "search_queries": len(searches),
        "search_words_with_hits": sum(1 for n in matched if n),
    }


def measure_export(server: Server) -> dict[str, Any]:
    peak = [server.memory_kib("VmRSS")]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(server.memory_kib("VmRSS"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = size = 0
    started = time.perf_counter()
    try:
        with (
            httpx2.Client(base_url=server.base, timeout=600) as client,
            client.stream("GET", "/internal/exports/conversations.ndjson") as answer,
        ):
            announced = int(answer.headers["x-kbms-count"])
            tail = b""
            for chunk in answer.iter_bytes():
                size += len(chunk)
                lines += chunk.count(b"\n")
                tail = chunk[-1:]
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    if lines != announced or tail != b"\n":
        sys.exit(f"export: {lines} lines, X-Kbms-Count said {announced}")
    return {
        "lines": lines,
        "bytes": size,
        "seconds": round(seconds, 1),
        "lines_per_second": round(lines / seconds),
        "server_rss_peak_mib": round(max(peak) / 1024, 1),
        "server_vmhwm_mib": round(server.memory_kib("VmHWM") / 1024, 1),
    }


def stored(url: str) -> int:
    if url.startswith("postgresql://"):
        try:
            with psycopg.connect(url, connect_timeout=10) as db:
                row = db.execute("SELECT count(*) FROM conversations").fetchone()
        except psycopg.Error:  # no such database, or not migrated yet
            return 0
        return int(row[0]) if row else 0
    path = Path(url.removeprefix("sqlite:///"))
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            return int(db.execute("SELECT count(*) FROM conversations").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def build(url: str, source: Path, count: int, reuse: bool) -> float | None:
    """The database at ``url`` with the first ``count`` conversations of ``source``; None if reused."""
    if reuse and stored(url) >= count:
        return None
    if url.startswith("postgresql://"):
        server, name = url.rsplit("/", 1)
        create_database(server, name, None)
    else:
        Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    subprocess.run([str(KBMS), "migrate", "--database-url", url], check=True, capture_output=True)  # noqa: S603
    return round(ingest(source, url), 1)


def database_bytes(url: str, directory: Path) -> int:
    if url.startswith("postgresql://"):
        with psycopg.connect(url, connect_timeout=10) as db:
            row = db.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0
    return sum(p.stat().st_size for p in directory.glob("large.db*"))


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in rounds[0].items() if isinstance(v, float)]
    return rounds[0] | {k: round(statistics.median(r[k] for r in rounds), 2) for k in keys} | {"rounds": len(rounds)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    OUT.mkdir(exist_ok=True)
    large = corpus(args.large)
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kbms-scale-"))
    directory.mkdir(parents=True, exist_ok=True)
    if args.engine == "postgres":
        prefix = "kbms_scale_" if args.keep else f"kbms_scale_{os.getpid()}_"
        names = (
            {"small": str(args.small), "large": str(args.large)} if args.keep else {"small": "small", "large": "large"}
        )
        urls = {size: database_url(args.postgres, prefix + name) for size, name in names.items()}
    else:
        urls = {"small": f"sqlite:///{directory / 'small.db'}", "large": f"sqlite:///{directory / 'large.db'}"}
    log = directory / "server.log"
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "engine": args.engine}
    try:
        small = head(large, args.small, directory / f"first-{args.small}.ndjson")
        results["ingest_small_seconds"] = build(urls["small"], small, args.small, args.reuse)
        results["ingest_large_seconds"] = build(urls["large"], large, args.large, args.reuse)
        results["database_bytes"] = database_bytes(urls["large"], directory)
        # The two sizes alternate, round after round, so that both see the same machine.
        measured: dict[str, list[dict[str, Any]]] = {"small": [], "large": []}
        for _ in range(args.rounds):
            for size, count in (("small", args.small), ("large", args.large)):
                server = Server(urls[size], args.port, log)
                try:
                    measured[size].append(measure_reads(server, count))
                finally:
                    server.stop()
                print(f"{size}: {measured[size][-1]}", flush=True)
        results["small"], results["large"] = median_of(measured["small"]), median_of(measured["large"])
        server = Server(urls["large"], args.port, log)
        try:
            results["export"] = measure_export(server)
            print(f"export: {results['export']}", flush=True)
        finally:
            server.stop()
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
            if args.engine == "postgres":
                drop_databases(args.postgres, f"kbms_scale_{os.getpid()}_")
    small_p50, large_p50 = results["small"]["list_p50_ms"], results["large"]["list_p50_ms"]
    results["targets"] = {
        "list_p50_ratio": round(large_p50 / small_p50, 2),
        "list_p50_ratio_met": large_p50 <= 1.5 * small_p50,
        "search_p50_met": results["large"]["search_p50_ms"] < 50,
        "export_rss_met": results["export"]["server_rss_peak_mib"] < 200,
    }
    (OUT / ("scale.json" if args.engine == "sqlite" else f"scale-{args.engine}.json")).write_text(
        json.dumps(results, indent=2) + "\n"
    )
    return results


def table(results: dict[str, Any]) -> str:
    small, large, export = results["small"], results["large"], results["export"]
    targets = results["targets"]
    return "\n".join(
        [
            f"Reads at scale ({ENGINES[results.get('engine', 'sqlite')]}, one `kbms serve` process, sequential "
            f"requests, medians of {large['rounds']} alternating rounds; {results['date']}):",
            "",
            f"| metric | {small['stored']:,} stored | {large['stored']:,} stored | target |",
            "|---|---:|---:|---|",
            f"| list page p50 ms (first page and {large['cursor_pages']} cursor pages) | {small['list_p50_ms']} | "
            f"{large['list_p50_ms']} | large ≤ 1.5× small: {targets['list_p50_ratio']}× |",
            f"| list page p95 ms | {small['list_p95_ms']} | {large['list_p95_ms']} | |",
            f"| single-word search p50 ms ({large['search_queries']} queries) | {small['search_p50_ms']} | "
            f"{large['search_p50_ms']} | < 50 ms |",
            f"| single-word search p95 ms | {small['search_p95_ms']} | {large['search_p95_ms']} | |",
            f"| NDJSON export of everything: server RSS peak MiB | | {export['server_rss_peak_mib']} | < 200 MB |",
            f"| NDJSON export: lines, seconds | | {export['lines']:,} in {export['seconds']} s | |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two sizes (medians)")
    parser.add_argument("--keep", help="build the databases in this folder and keep them (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="with --keep: use the databases already there")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="sqlite")
    parser.add_argument(
        "--postgres", default="postgresql://postgres@127.0.0.1:5432", help="with --engine postgres: the server"
    )
    args = parser.parse_args()
    results = run(args)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
