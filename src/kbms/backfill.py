"""Backfills: a file of conversations ingested in batches, on every core.

A file is read as NDJSON (or one JSON document, or a JSON array) and cut into chunks of lines. Each chunk is one
``ingest_batch``: one ledger lookup, one write transaction, one commit, and every line succeeds or fails alone,
exactly as if it had been pushed. Validating and mapping take most of the time (about 80% of a conversation's
CPU, measured), so large files are spread over worker processes, one per core; their writes meet in the database
(on SQLite, one writer at a time, behind a lock file), where the unique keys keep them exact whatever the order.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from kbms.errors import InputError, StorageUnavailable, ValidationFailed
from kbms.ingest import Refused, ingest_batch
from kbms.limits import PayloadLimits
from kbms.process import tune_garbage_collection
from kbms.providers import Provider, get_provider
from kbms.settings import Settings
from kbms.storage import Store, failure_reason, open_store

log = logging.getLogger(__name__)

CHUNK_LINES = 500
CHUNK_BYTES = 4 << 20
# Below this a file is ingested in-process: starting workers (about a second each) would cost more than it saves.
POOL_MIN_BYTES = 16 << 20
WHOLE_FILE_LIMIT = 64 << 20  # a single JSON document larger than this is not a conversation

Record = tuple[int, bytes]  # (line number, payload)


class UnreadableFile(Exception):
    """The input file cannot be read as NDJSON, a JSON document or a JSON array."""


@dataclass
class IngestReport:
    results: Counter[str] = field(default_factory=Counter)
    rejects: list[tuple[int, str]] = field(default_factory=list)
    unavailable: str | None = None  # why the database failed (then the rest of the file was not ingested)

    @property
    def written(self) -> int:
        """Conversations created or updated."""
        return self.results["created"] + self.results["updated"]

    def add(self, other: IngestReport) -> None:
        self.results.update(other.results)
        self.rejects.extend(other.rejects)
        self.unavailable = self.unavailable or other.unavailable


def read_records(path: Path) -> Iterator[Record]:
    """(line number, payload) of an NDJSON file, a JSON document (1, whole) or a JSON array (item number, item).

    A file is one document only if it parses as one; anything else is read line by line, so one bad line costs
    that line alone. A JSON array is all or nothing: JSON cannot say where a broken array's items end.
    """
    with path.open("rb") as handle:
        head = handle.read(1 << 16).lstrip()
    if head.startswith(b"["):
        try:
            items = json.loads(path.read_bytes())
        # ValueError includes UnicodeDecodeError; the json module recurses per level of nesting, and deeper
        # documents than the interpreter's recursion limit raise RecursionError.
        except (ValueError, RecursionError) as exc:
            raise UnreadableFile(f"{path} starts like a JSON array but is not one: {exc}") from None
        if isinstance(items, list):
            for index, item in enumerate(items, start=1):
                yield index, json.dumps(item, ensure_ascii=False).encode()
            return
    first_line = head.split(b"\n", 1)[0]
    if head.startswith(b"{") and not _is_complete_json(first_line) and path.stat().st_size <= WHOLE_FILE_LIMIT:
        whole = path.read_bytes()
        if _is_complete_json(whole):
            yield 1, whole
            return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                # Without its line break: the ledger keeps (and hashes) the document, as if it had been pushed.
                yield number, line.rstrip(b"\r\n")


def readers_of(
    path: Path, providers: Iterable[Provider], *, workspace: str | None, default_workspace: str, sample: int
) -> list[str]:
    """The providers that validate every one of the first ``sample`` records of ``path``: for the hint of a file
    whose every line was rejected because it was read as another provider's. Pure: nothing is stored."""
    records = list(islice(read_records(path), sample))
    readers = []
    for provider in providers:
        try:
            for _number, body in records:
                provider.parse_push(body, workspace=workspace, default_workspace=default_workspace)
        except InputError:
            continue
        readers.append(provider.name)
    return readers if records else []


def _is_complete_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):  # too deep for the json module: pydantic's parser says what is wrong
        return False
    return True


def chunks(records: Iterable[Record], *, lines: int | None = None, size: int | None = None) -> Iterator[list[Record]]:
    """Records in groups of at most ``lines`` lines (``CHUNK_LINES``), and about ``size`` bytes (``CHUNK_BYTES``)."""
    lines = lines or CHUNK_LINES
    size = size or CHUNK_BYTES
    chunk: list[Record] = []
    total = 0
    for record in records:
        chunk.append(record)
        total += len(record[1])
        if len(chunk) >= lines or total >= size:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


def reason(exc: InputError) -> str:
    if isinstance(exc, ValidationFailed):
        return "; ".join(f"{i.field}: {i.message} ({i.issue})" for i in exc.issues)
    return exc.message


async def ingest_chunk(
    store: Store,
    provider: Provider,
    chunk: list[Record],
    *,
    workspace: str | None,
    default_workspace: str,
    limits: PayloadLimits,
) -> IngestReport:
    report = IngestReport()
    try:
        outcomes = await ingest_batch(
            store,
            provider,
            [payload for _, payload in chunk],
            workspace=workspace,
            default_workspace=default_workspace,
            limits=limits,
            parse_inline=True,
        )
    except StorageUnavailable as exc:
        report.unavailable = failure_reason(exc)
        return report
    for (number, _), outcome in zip(chunk, outcomes, strict=True):
        if isinstance(outcome, Refused):
            report.results["rejected"] += 1
            report.rejects.append((number, reason(outcome.error)))
        else:
            report.results[outcome.result] += 1
    return report


def ingest_file(
    settings: Settings,
    provider: str,
    path: Path,
    *,
    workspace: str | None,
    jobs: int | None,
    advance: Callable[[int], None],
) -> IngestReport:
    """Ingest every record of ``path``; ``advance`` hears how many bytes were done. ``jobs``: None for one per core.

    Stops at the first chunk the database fails (``report.unavailable``); what was committed before stays.
    """
    processes = jobs or os.cpu_count() or 1
    if processes > 1 and path.stat().st_size >= POOL_MIN_BYTES:
        report = _in_workers(settings, provider, path, workspace=workspace, processes=processes, advance=advance)
    else:
        report = asyncio.run(_in_process(settings, provider, path, workspace=workspace, advance=advance))
    if report.unavailable is None and report.written:
        asyncio.run(_refresh_statistics(settings))
    return report


class Statistics:
    """When a backfill refreshes the planner's statistics as it goes: each time it has written as many rows again as
    at the last refresh, from ``first`` on (so about twenty times for a billion). A bulk load outruns autovacuum
    (and a server may run without it): on PostgreSQL, with no statistics, a chunk's ledger lookup of 500 keys was
    planned as a scan of all the provider's rows and took 8.5 s at 540,000 conversations, then timed out; with
    them, 500 index probes."""

    def __init__(self, first: int = 10_000) -> None:
        self._next = first

    def due(self, written: int) -> bool:
        if written < self._next:
            return False
        self._next = 2 * written
        return True


async def _refresh_statistics(settings: Settings, store: Store | None = None) -> None:
    """A bulk load leaves the planner's statistics stale until autovacuum comes by (PostgreSQL): refresh them, so
    that the backfill's own lookups, and the first searches after it, are planned on what is there. Best effort:
    autovacuum will."""
    own = store is None
    store = open_store(settings, command=True) if store is None else store
    try:
        await store.refresh_statistics()
    except StorageUnavailable as exc:
        log.warning("statistics not refreshed during or after the backfill (%s): autovacuum will", exc)
    finally:
        if own:
            await store.close()


async def _in_process(
    settings: Settings, provider: str, path: Path, *, workspace: str | None, advance: Callable[[int], None]
) -> IngestReport:
    report = IngestReport()
    source = get_provider(provider)
    limits = PayloadLimits.of(settings)
    store = open_store(settings, command=True)
    tune_garbage_collection()
    statistics = Statistics()
    # Two chunks in flight: one is validated on this thread while the other one's commit waits for the disk.
    slots = asyncio.Semaphore(2)
    failures: list[BaseException] = []  # a bug: stop, and say so (the chunks committed before stay)

    async def one(chunk: list[Record]) -> None:
        try:
            if report.unavailable is None and not failures:
                default = settings.default_workspace
                ingested = ingest_chunk(
                    store, source, chunk, workspace=workspace, default_workspace=default, limits=limits
                )
                report.add(await ingested)
                if statistics.due(report.written):
                    await _refresh_statistics(settings, store)
        except Exception as exc:
            failures.append(exc)
        finally:
            slots.release()
            advance(sum(len(payload) + 1 for _, payload in chunk))

    running: set[asyncio.Task[None]] = set()
    try:
        for chunk in chunks(read_records(path)):
            await slots.acquire()
            if report.unavailable is not None or failures:
                break
            task = asyncio.create_task(one(chunk))
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        # Whatever stops the reading (the end, a bad file, the database), the chunks under way finish first.
        await asyncio.gather(*running)
        await store.close()
    if failures:
        raise failures[0]
    return report


def _in_workers(
    settings: Settings,
    provider: str,
    path: Path,
    *,
    workspace: str | None,
    processes: int,
    advance: Callable[[int], None],
) -> IngestReport:
    report = IngestReport()
    statistics = Statistics()
    # spawn: a fresh interpreter per worker (no copy of this process's connections, threads or locks).
    with ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_start,
        initargs=(
            settings.database_url,
            settings.db_timeout,
            provider,
            workspace,
            settings.default_workspace,
            PayloadLimits.of(settings),
        ),
    ) as pool:
        running: dict[Future[IngestReport], int] = {}

        def collect(block: bool) -> None:
            done, _ = wait(running, return_when=FIRST_COMPLETED, timeout=None if block else 0)
            for future in done:
                report.add(future.result())
                advance(running.pop(future))
            if done and report.unavailable is None and statistics.due(report.written):
                asyncio.run(_refresh_statistics(settings))  # the workers go on with the chunks they hold

        for chunk in chunks(read_records(path)):
            while len(running) >= 2 * processes:
                collect(block=True)
            if report.unavailable is not None:
                break
            running[pool.submit(_worker_ingest, chunk)] = sum(len(payload) + 1 for _, payload in chunk)
            collect(block=False)
        while running:
            collect(block=True)
    return report


# One store and one event loop per worker process, for all the chunks it is given.
_worker: tuple[asyncio.AbstractEventLoop, Store, Provider, str | None, str, PayloadLimits] | None = None


def _worker_start(
    database_url: str,
    db_timeout: float,
    provider: str,
    workspace: str | None,
    default_workspace: str,
    limits: PayloadLimits,
) -> None:
    global _worker
    loop = asyncio.new_event_loop()
    store = open_store(Settings(database_url=database_url, db_timeout=db_timeout), command=True)
    _worker = (loop, store, get_provider(provider), workspace, default_workspace, limits)
    tune_garbage_collection()
    atexit.register(lambda: loop.run_until_complete(store.close()))


def _worker_ingest(chunk: list[Record]) -> IngestReport:
    assert _worker is not None, "a worker is started before it is given work"
    loop, store, provider, workspace, default, limits = _worker
    chunk_ingested = ingest_chunk(store, provider, chunk, workspace=workspace, default_workspace=default, limits=limits)
    return loop.run_until_complete(chunk_ingested)
