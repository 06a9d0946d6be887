"""``kbms serve --workers 2`` without ``KBMS_CONSOLE_SECRET``: one secret made at start for every worker, so a
session signed by one worker is read by the other. Which worker accepts a connection is the kernel's choice (often
the same one), so the workers' environments are read too (Linux's /proc): each holds the same secret."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import pytest

from tests.conftest import migrated_sqlite_url, start_server
from tests.console.support import ADMIN, CSRF, KEYS


@pytest.mark.slow
def test_workers_share_the_console_secret(tmp_path: Path) -> None:
    env = {"KBMS_API_KEYS": json.dumps(KEYS), "KBMS_CONSOLE_SECRET": ""}
    server = start_server(migrated_sqlite_url(tmp_path), tmp_path / "serve.log", env=env, args=("--workers", "2"))
    try:
        with httpx2.Client(base_url=server.url, follow_redirects=False) as client:
            form = client.get("/console/login")
            found = CSRF.search(form.text)
            assert found is not None
            signed = client.post("/console/login", data={"key": ADMIN, "csrf": found.group(1)})
            assert signed.status_code == 303
            cookies = dict(client.cookies)
        for _ in range(12):
            with httpx2.Client(base_url=server.url, cookies=cookies, follow_redirects=False) as fresh:
                assert fresh.get("/console").status_code == 200
        secrets = [secret_of(pid) for pid in children(server.process.pid)]
        assert len(secrets) >= 2
        assert len(set(secrets)) == 1
        assert secrets[0]
    finally:
        server.stop()
    assert ADMIN not in (tmp_path / "serve.log").read_text()


def children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in found if secret_of(int(child)) is not None]


def secret_of(pid: int) -> str | None:
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if entry.startswith(b"KBMS_CONSOLE_SECRET="):
            return entry.split(b"=", 1)[1].decode()
    return None
