"""Who does the sync work: on SQLite one process (a lock beside the database); lease owners are told apart by host,
pid namespace and pid, so that only a process of this very namespace that has ended is taken for gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kbms.api import create_app
from kbms.providers import get_provider
from kbms.providers.pull import SourceConfig
from kbms.settings import Settings
from kbms.storage.base import Store
from kbms.sync.policy import is_gone, owner_name
from kbms.sync.service import SyncService

pytestmark = pytest.mark.anyio
SOURCE = SourceConfig(provider="intercom", workspace="w1", token="not-a-real-token")


async def test_one_process_holds_the_sync_work_of_a_sqlite_database_and_another_takes_over(
    store: Store, tmp_path: Path
) -> None:
    lock = tmp_path / "kbms.db.sync-lock"
    providers = {"intercom": get_provider("intercom")}
    first = SyncService(store, [SOURCE], providers, interval=3600, exclusive=lock)
    second = SyncService(store, [SOURCE], providers, interval=3600, exclusive=lock)
    assert first.holds_the_work()
    assert first.holds_the_work()  # held, and kept
    assert not second.holds_the_work()  # flock: another open file of the same lock is refused
    first.release_the_work()  # the first stops (or its process ends: the lock goes with it)
    assert second.holds_the_work()
    second.release_the_work()
    assert SyncService(store, [SOURCE], providers, interval=3600).holds_the_work()  # PostgreSQL: everyone works
    nowhere = SyncService(store, [SOURCE], providers, interval=3600, exclusive=tmp_path / "no" / "such" / "lock")
    assert nowhere.holds_the_work()  # a lock it cannot make: it syncs (alone, as on a laptop), and says so


def test_only_an_ended_process_of_this_host_and_pid_namespace_is_gone() -> None:
    mine = owner_name()
    host, namespace, pid, _ = mine.split(":")
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert not is_gone(mine)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead = ended.stdout.decode().strip()
    assert is_gone(f"{host}:{namespace}:{dead}:abcd1234")
    assert not is_gone(f"{host}:another-namespace:{dead}:abcd1234")  # a container sharing the host name
    assert not is_gone(f"another-host:{namespace}:{dead}:abcd1234")
    assert not is_gone(f"{host}:{dead}:abcd1234")  # an owner named by an older kbms: left to its lease


def test_a_process_keeps_to_its_share_of_a_sources_ceiling() -> None:
    assert SourceConfig("intercom", "w", "t").ceiling(1000) == 1000
    assert SourceConfig("intercom", "w", "t", max_requests_per_minute=300, share=4).ceiling(1000) == 75
    assert SourceConfig("intercom", "w", "t", share=4).ceiling(1000) == 250
    assert SourceConfig("intercom", "w", "t", max_requests_per_minute=3, share=4).ceiling(1000) == 1  # never none


def test_kbms_serves_workers_share_the_ceiling_on_postgresql_and_one_syncs_on_sqlite(database_url: str) -> None:
    source = {"provider": "intercom", "workspace": "w1", "token": "not-a-real-token", "base_url": "http://127.0.0.1:9"}
    settings = Settings(database_url=database_url, workers=3, sources=json.dumps([source]))
    app = create_app(settings)
    with TestClient(app):
        service = app.state.sync
        [configured] = service.sources.values()
        if database_url.startswith("sqlite"):
            assert (configured.config.share, service.holds_the_work()) == (1, True)
        else:
            assert configured.config.share == 3
