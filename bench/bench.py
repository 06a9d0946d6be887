"""``make bench``: kbms against the reference implementation of the original design, side by side, in one run.

1. the A/B harness (``harness/run.py``), in three comparisons whose rounds alternate (round 1 of each, then round 2
   of each, ...), each round starting the reference (A) and then kbms (B) on fresh databases and measuring ingest,
   redelivery, detail reads, the first list page, peak memory and server CPU per request:

   - **per core** (the headline): each server pinned to CPU 0, one process each (kbms ``--workers 1``), the load
     generator (wrk, and the harness itself) pinned to CPU 1: ``run.py --pin``;
   - **whole machine**: nothing pinned, kbms with its recommended ``--workers 2`` against the reference's one process;
   - **PostgreSQL**: the same, kbms with 2 workers on a fresh PostgreSQL database per round (``kbms_bench_<pid>_<port>``
     on ``--postgres``, created, migrated and dropped), the CPU of that database's backends counted apart; skipped,
     with a line in the summary saying why, when the server does not answer;

2. ``kbms ingest`` of a 100,000-conversation NDJSON file into a fresh SQLite database;
3. reads at scale (``scale.py``): list pages, single-word search and the NDJSON export of everything, at 10,000 and
   at ``--scale`` conversations on SQLite (1,000,000 by default: about 30 GB and most of the run's time; 0 skips it),
   then on PostgreSQL at ``--pg-scale`` (0 skips it).

Writes ``bench/out/results.json`` (each comparison's full record, every round of every side), ``bench/out/ingest.json``
and ``bench/out/summary.md`` (the tables the README carries). Needs ``wrk`` (Debian package ``wrk``): installed when
missing and running as root, otherwise the command to run is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pgdb import database_url, postmaster_pid, reachable  # bench/pgdb.py, next to this file
from pgdb import drop as drop_databases
from scale import corpus as make_corpus  # bench/scale.py, next to this file
from scale import table as scale_table

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "harness"
OUT = HERE / "out"
PYTHON = Path(sys.executable)
KBMS = PYTHON.parent / "kbms"

# Measured on the 2-core reference machine: two workers ingest 1.6-1.8x faster than one; reads and redeliveries
# stay many times the reference's (see the README). One process would leave a core to the load generator.
WORKERS = 2
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
# Per core: the servers on SERVER_CPU, wrk and the harness on CLIENT_CPU (run.py --pin).
SERVER_CPU, CLIENT_CPU = 0, 1

ROWS = [
    ("ingest_rps", "ingest req/s", "higher"),
    ("ingest_p99_ms", "ingest p99 ms", "lower"),
    ("dup_rps", "duplicate req/s", "higher"),
    ("read_rps", "detail read req/s", "higher"),
    ("read_p99_ms", "detail read p99 ms", "lower"),
    ("list_p50_ms", "first list page p50 ms", "lower"),
    ("peak_rss_mib", "peak RSS MiB", "lower"),
    ("ingest_server_cpu_us_per_req", "ingest CPU us/request", "lower"),
]
# ROWS' third column says which way is better; the ratio column is kbms / reference either way.
CPU_ROWS = [("ingest", "ingest"), ("dup", "duplicate"), ("read", "detail read")]
COMPARISONS = ("per_core", "whole_machine", "postgres")


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get install wrk)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)  # noqa: S607 (the system's own apt-get)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)  # noqa: S607
        return
    sys.exit("wrk is needed: sudo apt-get install wrk")


def kbms_template(workers: int, url: str, before: str = "") -> str:
    kbms = shlex.quote(str(KBMS))
    return (
        f"{before}{kbms} migrate --database-url {url} >/dev/null && "
        f"exec {kbms} serve --port {{port}} --workers {workers} --database-url {url}"
    )


# exec: the reference runs as one process, not under a shell (one process each, per core).
REFERENCE = "cd {bench}/seedref && KBMS_DB_PATH={db} exec {python} -m uvicorn app.main:app --port {port}"


def pg_prefix() -> str:
    return f"kbms_bench_{os.getpid()}_"


def comparison_args(name: str, args: argparse.Namespace) -> list[str]:
    """run.py's arguments for one comparison (sides, pinning), without the round's."""
    if name == "per_core":
        product = kbms_template(1, "sqlite:///{db}")
        pin = ["--pin", "--server-cpus", str(SERVER_CPU), "--client-cpus", str(CLIENT_CPU)]
        return ["--a", REFERENCE, "--b", product, *pin]
    if name == "whole_machine":
        return ["--a", REFERENCE, "--b", kbms_template(args.workers, "sqlite:///{db}")]
    # PostgreSQL: the database is named after the server's port, which run.py picks; create drops the previous
    # round's. run.py wants a {db} in every template: here it is unused (": {db}" does nothing).
    name_of = pg_prefix() + "{port}"
    url = shlex.quote(database_url(args.postgres, name_of))
    create = (
        f": {{db}} && {shlex.quote(str(PYTHON))} {shlex.quote(str(HERE / 'pgdb.py'))} create "
        f"{shlex.quote(args.postgres)} {name_of} --drop-prefix {pg_prefix()} && "
    )
    # The backends of that database: PostgreSQL titles them "postgres: [cluster: ]user database host(port) state",
    # autovacuum workers "postgres: [cluster: ]autovacuum worker database".
    backends = rf"^postgres: .*\b{name_of}\b"
    command = ["--a", REFERENCE, "--b", kbms_template(args.workers, url, create), "--db-procs-b", backends]
    root = postmaster_pid(args.postgres)
    return command + (["--db-root-pid-b", str(root)] if root is not None else [])


def harness_corpus(count: int) -> Path:
    """The harness's corpus (seed 1, as run.py makes it), once for every comparison and round."""
    return make_corpus(count, seed=1, name="harness-corpus")


def harness_round(name: str, round_no: int, corpus: Path, args: argparse.Namespace) -> dict[str, Any]:
    record = OUT / "rounds" / f"{name}-{round_no}.json"
    command = [
        str(PYTHON), str(HARNESS / "run.py"), *comparison_args(name, args),
        "--label-a", "reference", "--label-b", "kbms", "--corpus", str(corpus), "--seed", str(round_no),
        "--rounds", "1", "--duration", str(args.duration), "--json", str(record),
    ]  # fmt: skip
    print(f"=== {name.replace('_', ' ')}, round {round_no} of {args.rounds} ===", flush=True)
    subprocess.run(command, check=True)  # noqa: S603 (our own interpreter and harness)
    result = dict(json.loads(record.read_text()))
    check_round(name, result)
    return result


def check_round(name: str, result: dict[str, Any]) -> None:
    """Per core means what it says: stop rather than publish a table whose setup did not hold."""
    if name != "per_core":
        return
    kbms = result["sides"]["B"]["rounds"][-1]
    reference = result["sides"]["A"]["rounds"][-1]
    problems = []
    if kbms.get("server_processes") != 1:
        problems.append(f"kbms ran {kbms.get('server_processes')} processes, not 1")
    if reference.get("server_processes") != 1:
        problems.append(f"the reference ran {reference.get('server_processes')} processes, not 1")
    for label, side in (("kbms", kbms), ("reference", reference)):
        if side.get("server_cpus_allowed") != [SERVER_CPU]:
            problems.append(f"{label} could run on CPUs {side.get('server_cpus_allowed')}, not [{SERVER_CPU}]")
        if side.get("client_cpus_allowed") != [CLIENT_CPU]:
            problems.append(f"wrk could run on CPUs {side.get('client_cpus_allowed')}, not [{CLIENT_CPU}]")
    if problems:
        sys.exit("per-core comparison not as described: " + "; ".join(problems))


def merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One comparison's rounds (one run.py record each) as one record: every round, and medians per metric."""
    sides = {
        side: {
            "label": records[0]["sides"][side]["label"],
            "template": records[0]["sides"][side]["template"],
            "rounds": [r["sides"][side]["rounds"][0] for r in records],
        }
        for side in ("A", "B")
    }
    metrics = []
    for row in records[0]["metrics"]:
        key = row["metric"]
        a = [r[key] for r in sides["A"]["rounds"] if r.get(key) is not None]
        b = [r[key] for r in sides["B"]["rounds"] if r.get(key) is not None]
        a_median = statistics.median(a) if a else None
        b_median = statistics.median(b) if b else None
        ratio = b_median / a_median if a_median and b_median is not None else None
        metrics.append(
            row | {"a_median": a_median, "b_median": b_median, "ratio_b_over_a": ratio, "a_rounds": a, "b_rounds": b}
        )
    return {
        "config": records[0]["config"] | {"rounds": len(records)},
        "environment": records[0]["environment"],
        "metrics": metrics,
        "sides": sides,
    }


def harness(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """Every comparison, rounds alternating across them; the PostgreSQL one only if the server answers."""
    names = list(COMPARISONS)
    skipped = None
    if args.postgres_skip:
        skipped = "skipped (--no-postgres)"
    else:
        problem = reachable(args.postgres)
        if problem is not None:
            skipped = f"skipped: PostgreSQL not reachable at {args.postgres} ({problem})"
    if skipped:
        names.remove("postgres")
        print(f"PostgreSQL comparison {skipped}", flush=True)
    usable = os.sched_getaffinity(0)
    if not {SERVER_CPU, CLIENT_CPU} <= usable:
        sys.exit(f"per core needs CPUs {SERVER_CPU} and {CLIENT_CPU}; this process may use {sorted(usable)}")
    corpus = harness_corpus(args.n)
    # run.py's "--rounds < 2" warning is expected: it runs one round per call; the medians are taken across calls.
    print("each run.py call measures one round; bench.py takes the medians across its calls", flush=True)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        for round_no in range(1, args.rounds + 1):
            for name in names:
                records[name].append(harness_round(name, round_no, corpus, args))
    finally:
        if "postgres" in names:
            drop_databases(args.postgres, pg_prefix())
    results = {name: merge(rounds) for name, rounds in records.items()}
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results, skipped


def bulk_ingest(count: int) -> dict[str, Any]:
    source = make_corpus(count)
    with tempfile.TemporaryDirectory(prefix="kbms-bench-") as directory:
        url = f"sqlite:///{directory}/kbms.db"
        subprocess.run([str(KBMS), "migrate", "--database-url", url], check=True, capture_output=True)  # noqa: S603
        started = time.perf_counter()
        done = subprocess.run(  # noqa: S603
            [str(KBMS), "ingest", str(source), "--database-url", url], capture_output=True, text=True
        )
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"kbms ingest failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return {"conversations": count, "seconds": round(elapsed, 2), "per_second": round(count / elapsed)}


def scale(engine: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [str(PYTHON), str(HERE / "scale.py"), "--engine", engine, "--large", str(count)]
    command += ["--small", str(min(10_000, count // 2)), "--rounds", str(args.scale_rounds)]
    if engine == "postgres":
        command += ["--postgres", args.postgres]
    subprocess.run(command, check=True)  # noqa: S603 (our own interpreter and script)
    name = "scale.json" if engine == "sqlite" else f"scale-{engine}.json"
    return dict(json.loads((OUT / name).read_text()))


def comparison_table(record: dict[str, Any], kbms: str) -> list[str]:
    metrics = {row["metric"]: row for row in record["metrics"]}
    lines = [f"| metric | reference | {kbms} | kbms / reference |", "|---|---:|---:|---:|"]
    for key, label, _better in ROWS:
        row = metrics.get(key)
        if row is None or row["a_median"] is None or row["b_median"] is None:
            continue
        a, b = row["a_median"], row["b_median"]
        ratio = f"{b / a:.3f}" if a else "-"
        lines.append(f"| {label} | {a:.4g} | {b:.4g} | {ratio} |")
    return lines


def median(record: dict[str, Any] | None, side: str, key: str) -> float | None:
    if record is None:
        return None
    values = [r[key] for r in record["sides"][side]["rounds"] if r.get(key) is not None]
    return statistics.median(values) if values else None


def cpu_table(results: dict[str, Any], workers: int) -> list[str]:
    """Server CPU per request (utime + stime from /proc), medians, in microseconds."""
    whole, core, pg = results["whole_machine"], results["per_core"], results.get("postgres")
    head = ["reference (SQLite, 1 process)", "kbms on SQLite, 1 process pinned", f"kbms on SQLite, {workers} workers"]
    instance = pg is not None and median(pg, "B", "ingest_db_instance_cpu_us_per_req") is not None
    if pg is not None:
        head += [
            f"kbms on PostgreSQL, {workers} workers",
            "PostgreSQL's own: backends of kbms's database",
            "kbms + those backends",
        ]
    if instance:
        head.append("PostgreSQL, whole server (all its processes)")
    lines = ["| CPU µs per request | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    for phase, label in CPU_ROWS:
        server, db = f"{phase}_server_cpu_us_per_req", f"{phase}_db_cpu_us_per_req"
        cells = [median(whole, "A", server), median(core, "B", server), median(whole, "B", server)]
        if pg is not None:
            own, database = median(pg, "B", server), median(pg, "B", db)
            cells += [own, database, None if own is None or database is None else own + database]
        if instance:
            cells.append(median(pg, "B", f"{phase}_db_instance_cpu_us_per_req"))
        lines.append(f"| {label} | " + " | ".join(cell(c) for c in cells) + " |")
    return lines


def summary(
    results: dict[str, Any],
    postgres_skipped: str | None,
    ingest: dict[str, Any] | None,
    at_scale: list[dict[str, Any]],
    args: argparse.Namespace,
) -> str:
    today = datetime.date.today().isoformat()
    setup = (
        f"n={args.n}, {args.rounds} round(s) alternating across the comparisons, {args.duration:g} s per phase, "
        "32 connections; medians"
    )
    invocation = "`make bench-quick`: a development run, not figures to publish" if args.quick else "`make bench`"
    lines = [
        f"Measured {today}: {invocation} ({setup}).",
        "",
        f"**Per core** (the headline): each server pinned to CPU {SERVER_CPU}, one process each (kbms `--workers 1`, "
        f"the reference's one uvicorn process), the load generator (wrk) pinned to CPU {CLIENT_CPU}.",
        "",
        *comparison_table(results["per_core"], "kbms, 1 process"),
        "",
        f"**Whole machine** (nothing pinned): kbms with its recommended {args.workers} workers against the "
        "reference's one process, the load generator on the same cores.",
        "",
        *comparison_table(results["whole_machine"], f"kbms, {args.workers} workers"),
        "",
    ]
    if "postgres" in results:
        lines += [
            f"**kbms on PostgreSQL** (whole machine, {args.workers} workers, a fresh database per round on the local "
            "server; the reference stays on SQLite, its only engine).",
            "",
            *comparison_table(results["postgres"], f"kbms on PostgreSQL, {args.workers} workers"),
            "",
        ]
    else:
        lines += [f"**kbms on PostgreSQL** (and its reads at scale): {postgres_skipped}.", ""]
    caption = (
        "**Server CPU per request** (user + system CPU of the server's processes, read from /proc before and after "
        "each phase, divided by the requests answered"
    )
    if "postgres" in results:
        caption += (
            "; PostgreSQL's own: its backends serving kbms's database, background processes such as the WAL writer "
            "not counted; the whole server's column counts those, and the backends that exited during the phase, "
            "but also whatever other clients asked of it meanwhile"
        )
    lines += [
        caption + "):",
        "",
        *cpu_table(results, args.workers),
    ]
    if ingest is not None:
        lines += [
            "",
            f"`kbms ingest` of {ingest['conversations']:,} conversations (NDJSON, SQLite): "
            f"{ingest['seconds']} s, {ingest['per_second']:,} conversations/s.",
        ]
    for measured in at_scale:
        lines += ["", scale_table(measured)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="conversations in the harness corpus")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each comparison")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measured phase")
    parser.add_argument("--workers", type=int, default=WORKERS, help="kbms workers in the whole-machine comparisons")
    parser.add_argument("--ingest", type=int, default=100_000, help="conversations for the kbms ingest timing")
    parser.add_argument("--scale", type=int, default=1_000_000, help="reads at scale on SQLite, at this size (0: skip)")
    parser.add_argument("--pg-scale", type=int, default=1_000_000, help="reads at scale on PostgreSQL (0: skip)")
    parser.add_argument("--scale-rounds", type=int, default=3, help="alternating rounds of the reads at scale")
    parser.add_argument("--postgres", default=POSTGRES, help="PostgreSQL server for the comparison (no database)")
    parser.add_argument("--no-postgres", dest="postgres_skip", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--quick", action="store_true", help="a short run while developing (not for the README)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds, args.duration, args.ingest = 3_000, 1, 5.0, 10_000
        args.scale, args.pg_scale, args.scale_rounds = 20_000, 5_000, 1
    OUT.mkdir(exist_ok=True)
    (OUT / "rounds").mkdir(exist_ok=True)
    ensure_wrk()
    results, postgres_skipped = harness(args)
    ingest = bulk_ingest(args.ingest) if args.ingest else None
    if ingest is not None:
        (OUT / "ingest.json").write_text(json.dumps(ingest, indent=2) + "\n")
    at_scale = [scale("sqlite", args.scale, args)] if args.scale else []
    if args.pg_scale and postgres_skipped is None:
        at_scale.append(scale("postgres", args.pg_scale, args))
    text = summary(results, postgres_skipped, ingest, at_scale, args)
    (OUT / "summary.md").write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
