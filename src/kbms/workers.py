"""The parent process of ``kbms serve --workers N``: uvicorn's supervisor, plus the run's metrics directory.

Each worker counts its metrics into memory-mapped files of one directory (prometheus-client's multiprocess mode,
see ``kbms/api/metrics.py``). The directory must be new for each run, or counts of an earlier run would be added
to this one's; so it is created here, before the workers start (they inherit ``PROMETHEUS_MULTIPROC_DIR``), and
removed when they have stopped. Only a SIGKILL of this process leaves it behind, in the temporary directory.

``kbms serve`` replaces itself with this module (``python -m kbms.workers``), which imports uvicorn and the log
setup only: the app lives in the workers, and this process stays small (about 25 MB against 93 MB with the app).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import uvicorn

from kbms.logs import LEVELS, configure_logging

APP = "kbms.api:create_app_from_environment"
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # the variable prometheus-client reads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kbms.workers", description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--log-level", choices=sorted(LEVELS), default="info")
    # The read deadlines of kbms.server (kbms serve passes them; each worker reads its limits from KBMS_*).
    parser.add_argument("--http", default="auto")
    parser.add_argument("--timeout-keep-alive", type=int, default=5)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    directory = tempfile.mkdtemp(prefix="kbms-metrics-")
    os.environ[MULTIPROCESS_DIR] = directory
    try:
        uvicorn.run(
            APP,
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=None,  # configured above, as the workers configure theirs: JSON lines
            log_level=args.log_level,
            access_log=False,  # kbms writes its own access line (kbms/api/telemetry.py)
            server_header=False,
            http=args.http,
            timeout_keep_alive=args.timeout_keep_alive,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
