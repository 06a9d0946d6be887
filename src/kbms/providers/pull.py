"""What pulling from a provider's API is, for every provider that can be pulled from (issue 15).

A provider that kbms can pull from offers a ``Puller`` (``Provider.puller``, as ``Provider.webhooks`` offers its
webhooks). It opens a ``PullClient`` for one configured source. The use case (``kbms.sync``) lists what changed,
page by page, and fetches each listed conversation; the client does the provider's HTTP: authentication,
pagination, pacing to the advertised rate limit, retries of transient failures (5xx, timeouts, resets).

A client raises ``ProviderRefused`` when the provider refuses the credentials (401, 403), and
``ProviderUnreachable`` when it cannot be reached, or keeps answering something that is not its API, after its
retries. Nothing here knows about storage: the use case decides what is stored, and when a checkpoint moves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import httpx2

from kbms.errors import KbmsError


class ProviderRefused(KbmsError):
    """The provider refused the source's credentials, or their scope (401, 403): `kbms sync` exits 4."""


class ProviderUnreachable(KbmsError):
    """The provider cannot be reached, or keeps answering something that is not its API: `kbms sync` exits 5."""


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """One configured source, as a client needs it (``KBMS_SOURCES``). The token never appears in a repr."""

    provider: str
    workspace: str
    token: str = field(repr=False)
    email: str | None = None
    base_url: str | None = None  # None: the provider's public API for that workspace
    max_requests_per_minute: int | None = None  # None: the client's default, well under the provider's
    # How many processes sync this source at once, each keeping to its part of the ceiling (kbms serve's workers
    # on PostgreSQL); not configured, but set by the process that syncs.
    share: int = 1

    def ceiling(self, default: int) -> int:
        """The requests a minute this process may make to the source: its part of the source's ceiling."""
        return max(1, (self.max_requests_per_minute or default) // self.share)


@dataclass(frozen=True, slots=True)
class Listed:
    """One conversation a listing says changed."""

    external_id: str
    updated_at: int | None  # microseconds, as the listing says; None when it does not say
    # The listing's own copy of the conversation, when it carries what fetching would ask for again (Zendesk's
    # export gives the ticket; the comments still have to be fetched). Raw JSON bytes, as the provider sent them.
    prefetched: bytes | None = None


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a listing of what changed."""

    items: tuple[Listed, ...]
    # Where the next page starts: opaque to the use case, kept as the source's cursor once every item of this
    # page is stored or queued, and handed back to ``list_changed`` to resume.
    position: str | None
    done: bool  # no further page for now (the listing has caught up)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A conversation as the provider holds it now."""

    external_id: str
    # What ``Provider.parse_push`` reads (for Zendesk: the ticket, all its comments and their users, assembled);
    # when ``deleted``, the provider's own answer (a 404's body, or the deleted ticket).
    body: bytes
    deleted: bool = False
    # How complete the conversation is, the mapper reads from ``body`` itself (``completeness`` in the model), as
    # it does for a push and as ``kbms reprocess`` does again from the ledger.


@dataclass(slots=True)
class ClientStats:
    """What a client did, for ``GET /internal/sources``, the metrics and ``kbms sync``'s summary."""

    requests: int = 0
    retries: int = 0
    rate_limit_waits: int = 0  # times the client waited for the provider's budget (or a 429's Retry-After)
    rate_limited: int = 0  # 429 answers received
    waited_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Timing:
    """The clock a client paces itself by and how it waits: the wall clock in production; tests give a virtual
    clock whose ``sleep`` advances it, so that pacing is exact and takes no time."""

    now: Callable[[], float] = time.time  # seconds since the epoch, as rate-limit resets are given
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


class PullClient(Protocol):
    """A provider's API, for one source."""

    stats: ClientStats

    async def check(self) -> None:
        """That the credentials work (and name the configured workspace, where the provider says which it is)."""
        ...

    async def list_changed(self, *, since: int | None, position: str | None) -> ListPage:
        """A page of the conversations updated at or after ``since`` (microseconds; None: all of them), starting
        at ``position`` (a previous page's; None: the first)."""
        ...

    async def fetch(self, listed: Listed) -> Fetched:
        """The conversation in full, as the provider holds it now."""
        ...

    async def aclose(self) -> None: ...


class Puller(Protocol):
    """How a provider is pulled from."""

    def default_base_url(self, workspace: str) -> str:
        """The provider's public API for ``workspace`` (the base URL when a source names none)."""
        ...

    def client(
        self, source: SourceConfig, *, transport: httpx2.AsyncBaseTransport | None = None, timing: Timing = Timing()
    ) -> PullClient:
        """A client for ``source``; ``transport`` replaces the network (tests, benchmarks), ``timing`` the clock."""
        ...
