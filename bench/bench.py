"""``make bench``: kbms against the reference implementation of the original design, side by side, in one run.

1. the A/B harness (``harness/run.py``): the reference (A) and kbms (B) started alternately on fresh SQLite
   databases, each measured on ingest, redelivery, detail reads, the first list page and peak memory;
2. ``kbms ingest`` of a 100,000-conversation NDJSON file into a fresh SQLite database;
3. reads at scale (``scale.py``): list pages, single-word search and the NDJSON export of everything, at 10,000 and
   at 1,000,000 conversations on SQLite (the database takes about 30 GB and the 1M ingest most of the run's time;
   ``--scale 0`` skips it).

Writes ``bench/out/results.json`` (the harness's full record), ``bench/out/ingest.json`` and
``bench/out/summary.md`` (the table the README carries). Needs ``wrk`` (Debian package ``wrk``): installed when
missing and running as root, otherwise the command to run is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scale import table as scale_table  # bench/scale.py, next to this file

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "harness"
OUT = HERE / "out"
PYTHON = Path(sys.executable)
KBMS = PYTHON.parent / "kbms"

# Measured on the 2-core reference machine: two workers ingest 1.6-1.8x faster than one; reads and redeliveries
# stay many times the reference's (see the README). One process would leave a core to the load generator.
WORKERS = 2

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


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get install wrk)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)  # noqa: S607 (the system's own apt-get)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)  # noqa: S607
        return
    sys.exit("wrk is needed: sudo apt-get install wrk")


def harness(args: argparse.Namespace) -> dict[str, Any]:
    product = (
        f"{shlex.quote(str(KBMS))} migrate --database-url sqlite:///{{db}} >/dev/null && "
        f"exec {shlex.quote(str(KBMS))} serve --port {{port}} --workers {args.workers} "
        "--database-url sqlite:///{db}"
    )
    reference = "cd {bench}/seedref && KBMS_DB_PATH={db} {python} -m uvicorn app.main:app --port {port}"
    results = OUT / "results.json"
    command = [
        str(PYTHON), str(HARNESS / "run.py"),
        "--a", reference, "--b", product, "--label-a", "reference", "--label-b", "kbms",
        "--n", str(args.n), "--rounds", str(args.rounds), "--duration", str(args.duration),
        "--json", str(results),
    ]  # fmt: skip
    subprocess.run(command, check=True)  # noqa: S603 (our own interpreter and harness)
    return dict(json.loads(results.read_text()))


def bulk_ingest(count: int) -> dict[str, Any]:
    corpus = OUT / f"corpus-{count}.ndjson"
    if not corpus.exists():
        generate = [str(PYTHON), str(HARNESS / "corpus.py"), "--n", str(count), "--seed", "7", "--out", str(corpus)]
        subprocess.run(generate, check=True)  # noqa: S603
    with tempfile.TemporaryDirectory(prefix="kbms-bench-") as directory:
        url = f"sqlite:///{directory}/kbms.db"
        subprocess.run([str(KBMS), "migrate", "--database-url", url], check=True, capture_output=True)  # noqa: S603
        started = time.perf_counter()
        done = subprocess.run(  # noqa: S603
            [str(KBMS), "ingest", str(corpus), "--database-url", url], capture_output=True, text=True
        )
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"kbms ingest failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return {"conversations": count, "seconds": round(elapsed, 2), "per_second": round(count / elapsed)}


def scale(count: int) -> dict[str, Any]:
    subprocess.run([str(PYTHON), str(HERE / "scale.py"), "--large", str(count)], check=True)  # noqa: S603
    return dict(json.loads((OUT / "scale.json").read_text()))


def summary(
    results: dict[str, Any], ingest: dict[str, Any] | None, at_scale: dict[str, Any] | None, args: argparse.Namespace
) -> str:
    metrics = {row["metric"]: row for row in results["metrics"]}
    today = datetime.date.today().isoformat()
    lines = [
        f"Measured {today}: `make bench` (n={args.n}, {args.rounds} alternating rounds of {args.duration:g} s, "
        f"32 connections, kbms with {args.workers} workers; medians).",
        "",
        "| metric | reference | kbms | kbms / reference |",
        "|---|---:|---:|---:|",
    ]
    for key, label, _better in ROWS:
        row = metrics.get(key)
        if row is None or row["a_median"] is None or row["b_median"] is None:
            continue
        a, b = row["a_median"], row["b_median"]
        ratio = f"{b / a:.3f}" if a else "-"
        lines.append(f"| {label} | {a:.4g} | {b:.4g} | {ratio} |")
    if ingest is not None:
        lines += [
            "",
            f"`kbms ingest` of {ingest['conversations']:,} conversations (NDJSON, SQLite): "
            f"{ingest['seconds']} s, {ingest['per_second']:,} conversations/s.",
        ]
    if at_scale is not None:
        lines += ["", scale_table(at_scale)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="conversations in the harness corpus")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measured phase")
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--ingest", type=int, default=100_000, help="conversations for the kbms ingest timing")
    parser.add_argument("--scale", type=int, default=1_000_000, help="conversations for the reads at scale (0: skip)")
    parser.add_argument("--quick", action="store_true", help="a short run while developing (not for the README)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds, args.duration, args.ingest, args.scale = 3_000, 1, 5.0, 10_000, 20_000
    OUT.mkdir(exist_ok=True)
    ensure_wrk()
    results = harness(args)
    ingest = bulk_ingest(args.ingest) if args.ingest else None
    if ingest is not None:
        (OUT / "ingest.json").write_text(json.dumps(ingest, indent=2) + "\n")
    at_scale = scale(args.scale) if args.scale else None
    text = summary(results, ingest, at_scale, args)
    (OUT / "summary.md").write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
