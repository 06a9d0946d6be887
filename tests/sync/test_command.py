"""``kbms sync`` as operators run it, against the fake Intercom served over HTTP, on both engines: a pass stores
exactly the fake's conversations; a wrong token, an unreachable provider or one answering garbage is one line and
exit 4, 5, 5 with nothing half-stored; a process killed at random points and run again ends in exactly the fake's
state, fetching no conversation more than once again."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from kbms.cli import app
from kbms.settings import Settings
from kbms.storage import open_store
from tests.providers.intercom.fake import FakeIntercom
from tests.support.served import served

T0 = 1_650_000_000


@pytest.fixture
def fake() -> Iterator[tuple[FakeIntercom, str]]:
    intercom = FakeIntercom(limit=100_000)  # this test is about the command, not pacing: no budget to wait for
    for i in range(60):
        intercom.add(f"{5000 + i}", updated_at=T0 + i, parts=i % 3)
    with served(intercom.app) as url:
        yield intercom, url


def sources(intercom: FakeIntercom, url: str, *, token: str | None = None) -> str:
    entry = {"provider": "intercom", "workspace": intercom.app_id, "token": token or intercom.token, "base_url": url}
    # No ceiling to wait for either: the fake's budget is unlimited, and this is not a test of pacing.
    return json.dumps([{**entry, "max_requests_per_minute": 1_000_000}])


def run(database_url: str, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["sync", "--database-url", database_url, *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def stored_ids(database_url: str) -> set[str]:
    import asyncio

    async def read() -> set[str]:
        store = open_store(Settings(database_url=database_url))
        try:
            page = await store.list_conversations(limit=500, cursor=None)
            return {item.external_id for item in page.items}
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_pass_stores_exactly_the_fakes_conversations_and_a_second_finds_nothing_new(
    database_url: str, fake: tuple[FakeIntercom, str]
) -> None:
    intercom, url = fake
    code, out, err = run(database_url, {"KBMS_SOURCES": sources(intercom, url)})
    assert (code, err) == (0, ""), err
    assert f"intercom/{intercom.app_id}" in out
    assert stored_ids(database_url) == set(intercom.conversations)
    assert intercom.retrieved().total() == 60
    code, out, err = run(database_url, {"KBMS_SOURCES": sources(intercom, url)})
    assert code == 0
    assert intercom.retrieved().total() == 60


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [("token", 4, "refused"), ("closed port", 5, "127.0.0.1"), ("garbage", 5, "not its API")],
)
def test_a_provider_that_refuses_or_cannot_be_used_is_one_line_and_its_exit_code(
    database_url: str, fake: tuple[FakeIntercom, str], case: str, code: int, words: str
) -> None:
    intercom, url = fake
    token = "wrong-token-" + "x" * 20 if case == "token" else None
    if case == "closed port":
        url = "http://127.0.0.1:9"
    if case == "garbage":
        intercom.outage = "garbage"
    got, out, err = run(database_url, {"KBMS_SOURCES": sources(intercom, url, token=token)})
    lines = err.strip().splitlines()
    assert (got, len(lines)) == (code, 1), err
    assert lines[0].startswith("kbms: ")
    assert words.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert intercom.token not in out + err
    assert token is None or token not in out + err
    assert stored_ids(database_url) == set()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_sync_killed_anywhere_and_run_again_ends_in_the_fakes_state(
    database_url: str, fake: tuple[FakeIntercom, str], seed: int
) -> None:
    intercom, url = fake
    for i in range(60, 400):  # enough work for a kill to land in the middle of it
        intercom.add(f"{5000 + i}", updated_at=T0 + i, parts=i % 3)
    env = {**os.environ, "KBMS_SOURCES": sources(intercom, url), "KBMS_DATABASE_URL": database_url}
    command = [sys.executable, "-m", "kbms", "sync"]
    delay = random.Random(seed).uniform(0.3, 2.0)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stderr
    assert stored_ids(database_url) == set(intercom.conversations)
    assert set(intercom.retrieved().values()) <= {1, 2}  # at most once again: those in flight when the first was killed
