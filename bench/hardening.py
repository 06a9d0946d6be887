"""Slow clients and overload, measured against a real ``kbms serve`` (or stock uvicorn, for comparison).

    python bench/hardening.py slow     [--server kbms|uvicorn] [--connections 200] [--duration 30]
    python bench/hardening.py overload [--server kbms|uvicorn] [--duration 30] [--factors 2,4]
    python bench/hardening.py all      (both, on kbms serve; what the README's figures come from)

slow: 200 slow connections are kept open for the whole run (half send their headers a byte every 2 s, half send a
complete head and then their body a byte every 2 s; each one the server closes is replaced at once), while a
legitimate client sends 40 requests/s (half detail reads, half ingests of new conversations). Reports the
legitimate requests' latency (p50/p99/max, from their scheduled time) and errors, and how long the server let each
slow connection live. Done when p99 < 500 ms and every slow connection is closed within 10 s.

overload: the capacity, the ingest rate of new conversations with 64 connections in a closed loop, then an open
loop (requests sent on schedule, whatever the answers: latency counts from the scheduled time, so a slow server
cannot slow the load down) at 2x that rate; the capacity again, then 4x; then half of it to see service resume. Reports
answers by status, 5xx other than 503, 503 without Retry-After, latency, and requests with no answer within 10 s.
Done when there are no 5xx but 503, every 503 has Retry-After, and the 503s come within 1 s.

Standard library only, plus the corpus generator of ``bench/harness``; one SQLite database per run, in a
temporary directory. The load generator shares the machine with the server (2 cores here): the figures are for
this machine, as ``make bench``'s are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
PYTHON = sys.executable
INGEST = "/integrations/intercom/conversations"
ANSWER_TIMEOUT = 10.0  # no answer within this is a hang

sys.path.insert(0, str(HERE / "harness"))
import corpus  # noqa: E402 (the harness's deterministic Intercom payloads)


@dataclass
class Answer:
    """A response, read by the minimal HTTP/1.1 client below (the instrument must cost far less than the server)."""

    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.usable = True
        self.idle_since = 0.0

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> Answer:
        head = f"{method} {path} HTTP/1.1\r\nhost: bench\r\n"
        if body or method == "POST":
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        content = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.usable = False
        return Answer(status, headers, content)

    def close(self) -> None:
        self.usable = False
        self.writer.close()


class Pool:
    """Keep-alive connections, opened on demand (an open loop must never wait for a free one).

    Like any HTTP client, it does not reuse a connection the server may be closing: the server closes idle ones
    after KBMS_KEEPALIVE_TIMEOUT (5 s), so one idle for 4 s or already at end-of-file is dropped.
    """

    STALE_AFTER = 4.0

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[Connection] = []
        self.opened = 0

    async def request(self, method: str, path: str, body: bytes = b"") -> Answer:
        now = time.monotonic()
        connection = None
        while self.idle and connection is None:
            connection = self.idle.pop()
            if connection.reader.at_eof() or now - connection.idle_since > self.STALE_AFTER:
                connection.close()
                connection = None
        if connection is None:
            connection = await Connection.open(self.port)
            self.opened += 1
        try:
            answer = await connection.request(method, path, body)
        except BaseException:
            connection.close()
            raise
        if connection.usable:
            connection.idle_since = time.monotonic()
            self.idle.append(connection)
        else:
            connection.close()
        return answer

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


@dataclass
class Record:
    """One request of a load phase: when it was due, how long its answer took, and what it was."""

    latency: float | None  # None: no answer (a hang, or the connection failed)
    status: int | None = None
    due: float = 0.0  # when it was due, in seconds from the start of its phase
    retry_after: str | None = None
    error: str | None = None


@dataclass
class Phase:
    name: str
    offered_rate: float
    duration: float
    records: list[Record] = field(default_factory=list)
    server_cpu: float = 0.0  # seconds of CPU the server process used during the phase
    client_cpu: float = 0.0  # and this load generator
    client_lag: float = 0.0  # the longest this generator's own event loop ran late: part of every latency measured
    started: float = 0.0  # loop time the phase started

    def report(self) -> dict[str, Any]:
        answered = [r for r in self.records if r.status is not None]
        latencies = sorted(r.latency for r in answered if r.latency is not None)
        unavailable = [r for r in answered if r.status == 503]
        statuses = Counter(str(r.status) for r in answered)
        errors = Counter(r.error for r in self.records if r.error is not None)
        return {
            "phase": self.name,
            "offered_per_s": round(self.offered_rate, 1),
            "requests": len(self.records),
            "answered": len(answered),
            "by_status": dict(sorted(statuses.items())),
            "succeeded_per_s": round(sum(1 for r in answered if r.status in (200, 201)) / self.duration, 1),
            "server_errors_other_than_503": sum(1 for r in answered if r.status >= 500 and r.status != 503),
            "503_without_retry_after": sum(1 for r in unavailable if not r.retry_after),
            "503_latency_max_ms": ms(max((r.latency or 0.0) for r in unavailable)) if unavailable else None,
            "503_latency_p99_ms": latency_figures(sorted(r.latency or 0.0 for r in unavailable))["p99_ms"],
            "503_within_1s": sum(1 for r in unavailable if (r.latency or 0.0) <= 1.0),
            "no_answer": sum(errors.values()),
            "errors": dict(errors),
            **latency_figures(latencies),
            "server_cpu_share": round(self.server_cpu / self.duration, 2),
            "client_cpu_share": round(self.client_cpu / self.duration, 2),
            "client_loop_lag_max_ms": ms(self.client_lag),
            "503_per_5s": [
                sum(1 for r in unavailable if window <= r.due < window + 5)
                for window in range(0, max(1, int(self.duration)), 5)
            ],
        }


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def cpu_of(phase: Phase, server_pid: int) -> AsyncIterator[None]:
    """Record the CPU server and generator use during the phase, and how late the generator's loop ran."""
    server_before, client_before = process_cpu(server_pid), time.process_time()
    loop = asyncio.get_running_loop()

    async def watch() -> None:
        while True:
            due = loop.time() + 0.01
            await asyncio.sleep(0.01)
            phase.client_lag = max(phase.client_lag, loop.time() - due)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        phase.server_cpu = process_cpu(server_pid) - server_before
        phase.client_cpu = time.process_time() - client_before


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def latency_figures(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return {"p50_ms": ms(statistics.median(latencies)), "p99_ms": ms(p99), "max_ms": ms(latencies[-1])}


async def timed(call: Callable[[], Awaitable[Answer]], due: float, phase: Phase) -> None:
    loop = asyncio.get_running_loop()
    try:
        answer = await asyncio.wait_for(call(), ANSWER_TIMEOUT)
    except TimeoutError:
        phase.records.append(Record(None, error="no answer within 10 s"))
        return
    except (OSError, asyncio.IncompleteReadError) as exc:
        phase.records.append(Record(None, error=type(exc).__name__))
        return
    retry_after = answer.headers.get("retry-after")
    phase.records.append(Record(loop.time() - due, answer.status, due - phase.started, retry_after))


async def open_loop(rate: float, duration: float, phase: Phase, make: Callable[[int], Callable[[], Awaitable[Answer]]]):
    """Start request i at start + i/rate, whatever happened to the others."""
    loop = asyncio.get_running_loop()
    start = phase.started = loop.time()
    total = int(rate * duration)
    running: set[asyncio.Task[None]] = set()
    sent = 0
    while sent < total:
        now = loop.time()
        while sent < total and start + sent / rate <= now:
            task = asyncio.create_task(timed(make(sent), start + sent / rate, phase))
            running.add(task)
            task.add_done_callback(running.discard)
            sent += 1
        await asyncio.sleep(0.001)
    await asyncio.gather(*running)


async def closed_loop(
    connections: int, duration: float, phase: Phase, make: Callable[[int], Callable[[], Awaitable[Answer]]]
):
    loop = asyncio.get_running_loop()
    phase.started = loop.time()
    end = phase.started + duration
    counter = iter(range(10**9))

    async def worker() -> None:
        while loop.time() < end:
            await timed(make(next(counter)), loop.time(), phase)

    await asyncio.gather(*(worker() for _ in range(connections)))


class Payloads:
    """Distinct Intercom conversations: corpus lines with a fresh conversation id for every request."""

    def __init__(self, count: int, tag: str) -> None:
        pools = corpus.build_pools(11)
        self.templates = []
        for i in range(count):
            conversation = corpus.make_conversation(i, 11, pools, prefix="T")
            self.templates.append((corpus.dumps(conversation).encode(), f'"{conversation["id"]}"'.encode()))
        self.tag = tag

    def get(self, i: int) -> bytes:
        body, old_id = self.templates[i % len(self.templates)]
        return body.replace(old_id, f'"{self.tag}-{i}"'.encode(), 1)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(kind: str, directory: Path, env: dict[str, str], postgres: str | None = None) -> Iterator[Server]:
    directory.mkdir(parents=True, exist_ok=True)
    with database(directory, postgres) as url, _serving(kind, directory, env, url) as running:
        yield running


@contextlib.contextmanager
def database(directory: Path, postgres: str | None) -> Iterator[str]:
    """An SQLite file in ``directory``, or a fresh schema in the ``postgres`` database (dropped after)."""
    if postgres is None:
        yield f"sqlite:///{directory / 'kbms.db'}"
        return
    from sqlalchemy import make_url  # kbms's own dependency: only needed for PostgreSQL runs

    from kbms.storage import admin_engine

    schema = f"bench_{os.getpid()}_{directory.name}"
    admin = admin_engine(postgres)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = make_url(postgres).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@contextlib.contextmanager
def _serving(kind: str, directory: Path, env: dict[str, str], url: str) -> Iterator[Server]:
    subprocess.run([PYTHON, "-m", "kbms", "migrate", "--database-url", url], check=True, capture_output=True)  # noqa: S603
    port = free_port()
    environment = {**os.environ, "KBMS_DATABASE_URL": url, "KBMS_LOG_LEVEL": "warning", **env}
    if kind == "kbms":
        command = [PYTHON, "-m", "kbms", "serve", "--port", str(port)]
    else:  # the same app under stock uvicorn (httptools), as kbms served it before
        command = [
            PYTHON, "-m", "uvicorn", "kbms.api:create_app_from_environment", "--factory", "--port", str(port),
            "--http", "httptools", "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
    log = directory / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)  # noqa: S603
    running = Server(process, port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                sys.exit(f"server exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"GET /health HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
                if probe.recv(64).startswith(b"HTTP/1.1 200"):
                    break
            if time.monotonic() > deadline:
                sys.exit(f"server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield running
    finally:
        running.stop()


@dataclass
class SlowStats:
    lifetimes: list[float] = field(default_factory=list)  # of the connections the server closed
    opened: int = 0
    open_at_end: list[float] = field(default_factory=list)  # ages of those still open when the run ended


async def slow_connection(port: int, kind: str, interval: float, stop: asyncio.Event, stats: SlowStats) -> None:
    """One slow client after another: each trickles a byte per ``interval`` until the server closes it."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(interval)
            continue
        opened = loop.time()
        stats.opened += 1
        if kind == "body":
            writer.write(f"POST {INGEST} HTTP/1.1\r\nhost: slow\r\ncontent-type: application/json\r\n".encode())
            writer.write(b"content-length: 100000\r\n\r\n")
        trickle = iter(f"POST {INGEST} HTTP/1.1\r\nhost: slow\r\nx-slow: ".encode() + b"a" * 10**6)
        closed = False
        while not stop.is_set() and not closed:
            writer.write(b"{" if kind == "body" else bytes([next(trickle)]))
            try:
                await writer.drain()
                # The server closing shows as end-of-file (or a reset) on the read side.
                data = await asyncio.wait_for(reader.read(65536), interval)
                closed = True if not data else await _drain_to_eof(reader)
            except TimeoutError:
                continue
            except OSError:
                closed = True
        if closed:
            stats.lifetimes.append(loop.time() - opened)
        else:
            stats.open_at_end.append(loop.time() - opened)
        writer.close()


async def _drain_to_eof(reader: asyncio.StreamReader) -> bool:
    with contextlib.suppress(OSError, TimeoutError):
        while await asyncio.wait_for(reader.read(65536), 15):
            pass
    return True


async def measure_slow(
    port: int, pid: int, *, connections: int, duration: float, interval: float, rate: float
) -> dict[str, Any]:
    seed = Pool(port)
    payloads = Payloads(200, f"slow-{port}")
    ids = []
    for i in range(100):
        answer = await seed.request("POST", INGEST, payloads.get(i))
        ids.append(json.loads(answer.body)["id"])
    stats = SlowStats()
    stop = asyncio.Event()
    attackers = [
        asyncio.create_task(slow_connection(port, "head" if i % 2 else "body", interval, stop, stats))
        for i in range(connections)
    ]
    await asyncio.sleep(interval * 2)  # every slow connection open before the measurement starts
    legit = Pool(port)
    rng = random.Random(5)  # noqa: S311 (which conversation to read, not a secret)
    phase = Phase("legitimate requests", rate, duration)

    def make(i: int) -> Callable[[], Awaitable[Answer]]:
        if i % 2:
            return lambda: legit.request("GET", f"/internal/conversations/{rng.choice(ids)}")
        return lambda: legit.request("POST", INGEST, payloads.get(1000 + i))

    async with cpu_of(phase, pid):
        await open_loop(rate, duration, phase, make)
    stop.set()
    await asyncio.gather(*attackers)
    legit.close()
    seed.close()
    report = phase.report()
    lifetimes = sorted(stats.lifetimes)
    return {
        "slow_connections_kept_open": connections,
        "byte_interval_s": interval,
        "legitimate": report,
        "slow_connections_opened": stats.opened,
        "slow_closed_by_server": len(lifetimes),
        "slow_lifetime_p50_s": round(statistics.median(lifetimes), 2) if lifetimes else None,
        "slow_lifetime_max_s": round(lifetimes[-1], 2) if lifetimes else None,
        "slow_closed_within_10s": sum(1 for t in lifetimes if t <= 10.0),
        "slow_still_open_at_end": len(stats.open_at_end),
        "slow_still_open_older_than_10s": sum(1 for t in stats.open_at_end if t > 10.0),
    }


async def measure_overload(port: int, pid: int, *, duration: float, factors: list[float]) -> dict[str, Any]:
    payloads = Payloads(2000, f"load-{port}")
    offset = 0

    def maker(pool: Pool) -> Callable[[int], Callable[[], Awaitable[Answer]]]:
        def make(i: int) -> Callable[[], Awaitable[Answer]]:
            body = payloads.get(offset + i)
            return lambda: pool.request("POST", INGEST, body)

        return make

    phases = []
    pool = Pool(port)
    warmup = Phase("warm-up", 0, 3)
    await closed_loop(16, 3, warmup, maker(pool))
    capacities = []
    # The CPU this process gets can drift from one minute to the next on a shared machine: the capacity is
    # measured again right before each overload phase, and the phase offers a multiple of that one.
    for factor in factors:
        offset += 10**6
        capacity_phase = Phase("capacity (64 connections, closed loop)", 0, duration / 2)
        async with cpu_of(capacity_phase, pid):
            await closed_loop(64, duration / 2, capacity_phase, maker(pool))
        capacity = capacity_phase.report()["succeeded_per_s"]
        capacity_phase.offered_rate = capacity
        capacities.append(capacity)
        phases.append(capacity_phase)
        offset += 10**6
        await asyncio.sleep(2)  # let the capacity phase drain
        phase = Phase(f"{factor:g}x capacity (open loop)", capacity * factor, duration)
        async with cpu_of(phase, pid):
            await open_loop(capacity * factor, duration, phase, maker(pool))
        phases.append(phase)
    offset += 10**6
    await asyncio.sleep(2)
    recovery = Phase("recovery at 0.5x capacity", capacities[-1] / 2, duration)
    async with cpu_of(recovery, pid):
        await open_loop(capacities[-1] / 2, duration, recovery, maker(pool))
    phases.append(recovery)
    pool.close()
    return {"capacities_per_s": capacities, "phases": [phase.report() for phase in phases]}


def run(coroutine: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop  # the server's own loop; a faster client disturbs the measurement less

        return uvloop.run(coroutine)  # type: ignore[no-any-return]
    except ImportError:
        return asyncio.run(coroutine)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["slow", "overload", "all"])
    parser.add_argument("--server", choices=["kbms", "uvicorn"], default="kbms")
    parser.add_argument("--connections", type=int, default=200, help="slow connections kept open")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between a slow client's bytes")
    parser.add_argument("--rate", type=float, default=40.0, help="legitimate requests per second during slow")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per measured phase")
    parser.add_argument("--factors", default="2,4", help="overload phases, as multiples of the capacity")
    parser.add_argument("--env", action="append", default=[], help="KBMS_X=value for the server (repeatable)")
    parser.add_argument("--postgres", help="a PostgreSQL database URL to run on (a fresh schema), instead of SQLite")
    parser.add_argument("--out", type=Path, default=OUT / "hardening.json")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    env = dict(item.split("=", 1) for item in args.env)
    engine = "postgresql" if args.postgres else "sqlite"
    results: dict[str, Any] = {"server": args.server, "database": engine, "env": env, "cpus": os.cpu_count()}
    results["load_average_before"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
    with tempfile.TemporaryDirectory(prefix="kbms-hardening-") as directory:
        if args.what in ("slow", "all"):
            with server(args.server, Path(directory) / "slow", env, args.postgres) as running:
                results["slow"] = run(
                    measure_slow(
                        running.port,
                        running.process.pid,
                        connections=args.connections,
                        duration=args.duration,
                        interval=args.interval,
                        rate=args.rate,
                    )
                )
            print(json.dumps(results["slow"], indent=2), flush=True)
        if args.what in ("overload", "all"):
            factors = [float(f) for f in args.factors.split(",")]
            with server(args.server, Path(directory) / "overload", env, args.postgres) as running:
                results["overload"] = run(
                    measure_overload(running.port, running.process.pid, duration=args.duration, factors=factors)
                )
            print(json.dumps(results["overload"], indent=2), flush=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
