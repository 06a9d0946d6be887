"""What a sync pass is given and gives back: its policy (how many fetches, retries, the lookback, leases) and its
report; and who holds a lease (a process, told apart from a restart of it)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from kbms.providers.pull import Timing

SECOND = 1_000_000  # microseconds
WALL_CLOCK = Timing()


@dataclass(frozen=True, slots=True)
class SyncPolicy:
    concurrency: int = 8  # fetches in flight
    claim_batch: int = 4  # jobs a fetcher claims at once (one transaction), then works one after the other
    max_attempts: int = 5  # claims of one job before it becomes a dead letter
    retry_after: float = 2.0  # seconds before a failed fetch is tried again; doubled per attempt
    retry_max: float = 300.0
    lookback: float = 120.0  # seconds listed again before the checkpoint
    lease: float = 300.0  # seconds a claim or the listing lease holds without being renewed
    # Whether a pass that has listed everything waits for the source's other queued fetches too (jobs due later,
    # or claimed by another process), for at most ``lease`` seconds: ``kbms sync``, which says "all stored" only
    # when it is so. The service's passes do not wait: the next one takes them up.
    drain: bool = False


DEFAULT_POLICY = SyncPolicy()


@dataclass(slots=True)
class PassReport:
    """What a pass did: ``kbms sync``'s summary and progress, and the source's totals."""

    provider: str
    workspace: str
    listed: int = 0
    skipped: int = 0  # listed, and already stored at that version
    fetched: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    rejected: int = 0  # refused by the mapper: kept in the ledger, the job a dead letter
    retried: int = 0
    dead: int = 0
    listing_done: bool = False
    left_queued: int = 0  # the source's fetches still queued when the pass ended (see ``SyncPolicy.drain``)
    errors: list[str] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return self.created + self.updated + self.unchanged + self.deleted


def owner_name() -> str:
    """Who holds a lease: this process (host, pid namespace and pid), told apart from a restart of it."""
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_namespace() -> str:
    # Containers may share a host name (a fixed --hostname, host networking) while each counts its own pids: a
    # pid means a process only within its namespace, which Linux names by this inode.
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def is_gone(owner: str) -> bool:
    """Whether a lease's owner is a process of this host and pid namespace that no longer runs (a killed
    ``kbms sync``): its leases can end now. Other owners are left to their leases' end."""
    host, namespace, pid, _ = [*owner.split(":", 3), "", "", ""][:4]
    if host != socket.gethostname() or namespace != _pid_namespace() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, as another user
    return False
