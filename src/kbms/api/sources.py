"""``/internal/sources``: what kbms knows about pulling from each configured source, and the operator's levers
(admin scope: a pass now, dead letters listed and retried). Tokens never appear: a source is its provider and
workspace."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, Field

from kbms.api.deps import StoreDep
from kbms.api.errors import ERROR_RESPONSES
from kbms.api.responses import json_response
from kbms.api.schemas import ErrorBody
from kbms.errors import NotFound
from kbms.model import from_micros
from kbms.providers.pull import SourceConfig
from kbms.storage.syncstate import DeadLetter, SourceState

router = APIRouter(tags=["sources"])
UNKNOWN_SOURCE = {
    404: {"model": ErrorBody, "description": "No such source is configured (or, for a pass, syncing is off here)"},
    **ERROR_RESPONSES,
}


class LastPass(BaseModel):
    started_at: datetime | None
    finished_at: datetime | None = Field(description="None while the pass runs")
    outcome: str | None = Field(description="running, ok, dead_letters, unreachable, refused or failed")


class SourceStatus(BaseModel):
    provider: str
    workspace: str
    state: str = Field(description="never_synced, syncing, ok, dead_letters or failing")
    checkpoint: datetime | None = Field(description="Conversations updated before this have been listed")
    stored_through: datetime | None = Field(
        description="Every conversation listed as updated up to here is stored (dead letters aside)"
    )
    last_pass: LastPass
    queue_depth: int = Field(description="Fetches waiting or running")
    dead_letters: int
    last_error: str | None
    listed: int
    fetched: int
    stored: int
    requests: int
    rate_limit_waits: int


class SourceList(BaseModel):
    items: list[SourceStatus]


class DeadLetterItem(BaseModel):
    external_id: str
    reason: str
    attempts: int
    last_error: str | None
    first_failed_at: datetime
    dead_at: datetime


class DeadLetterList(BaseModel):
    items: list[DeadLetterItem]
    next_after: str | None = Field(description="Pass as ?after= for the next page; None on the last")


class Accepted(BaseModel):
    provider: str
    workspace: str
    status: str = Field(description="started: a pass of the source begins now")


class Retried(BaseModel):
    retried: int = Field(description="Dead letters queued again")


def _time(value: int | None) -> datetime | None:
    return None if value is None else from_micros(value)


def status_of(state: SourceState | None, source: SourceConfig) -> SourceStatus:
    if state is None:
        return SourceStatus(
            provider=source.provider,
            workspace=source.workspace,
            state="never_synced",
            checkpoint=None,
            stored_through=None,
            last_pass=LastPass(started_at=None, finished_at=None, outcome=None),
            queue_depth=0,
            dead_letters=0,
            last_error=None,
            listed=0,
            fetched=0,
            stored=0,
            requests=0,
            rate_limit_waits=0,
        )
    outcome = state.pass_outcome
    if outcome == "running":
        label = "syncing"
    elif outcome in ("unreachable", "refused", "failed"):
        label = "failing"
    elif state.dead_letters:
        label = "dead_letters"
    else:
        label = "ok" if outcome is not None else "never_synced"
    return SourceStatus(
        provider=state.provider,
        workspace=state.workspace,
        state=label,
        checkpoint=_time(state.checkpoint),
        stored_through=_time(state.stored_through),
        last_pass=LastPass(
            started_at=_time(state.pass_started_at), finished_at=_time(state.pass_finished_at), outcome=outcome
        ),
        queue_depth=state.pending + state.running,
        dead_letters=state.dead_letters,
        last_error=state.last_error,
        listed=state.totals.listed,
        fetched=state.totals.fetched,
        stored=state.totals.stored,
        requests=state.totals.requests,
        rate_limit_waits=state.totals.rate_limit_waits,
    )


def _sources(request: Request) -> list[SourceConfig]:
    return list(request.app.state.sources)


def _source(request: Request, provider: str, workspace: str) -> SourceConfig:
    for source in _sources(request):
        if (source.provider, source.workspace) == (provider, workspace):
            return source
    raise NotFound("No such source is configured (GET /internal/sources lists them)")


@router.get("/internal/sources", response_model=SourceList, summary="Every configured source and its sync state")
async def list_sources(request: Request, store: StoreDep) -> Response:
    states = {(s.provider, s.workspace): s for s in await store.sync_states()}
    items = [status_of(states.get((s.provider, s.workspace)), s) for s in _sources(request)]
    return json_response(SourceList(items=items))


NO_NUL = r"^[^\x00]*$"  # a NUL is no name of anything kbms stores (a 422, as for every query parameter)
# A path that names no configured source is a 404, whatever it holds (as for a conversation id).
Provider = Annotated[str, Path()]
Workspace = Annotated[str, Path()]


@router.post(
    "/internal/sources/{provider}/{workspace}/sync",
    response_model=Accepted,
    status_code=202,
    summary="Start a pass of this source now",
    responses=UNKNOWN_SOURCE,
)
async def start_pass(request: Request, provider: Provider, workspace: Workspace) -> Response:
    _source(request, provider, workspace)
    service = request.app.state.sync
    if service is None or not service.sweep(provider, workspace):
        raise NotFound("Syncing is off in this process (KBMS_SYNC=off): start a pass with kbms sync")
    return json_response(Accepted(provider=provider, workspace=workspace, status="started"), status=202)


@router.get(
    "/internal/sources/{provider}/{workspace}/dead-letters",
    response_model=DeadLetterList,
    summary="The source's conversations whose fetch failed for good",
    responses=UNKNOWN_SOURCE,
)
async def list_dead_letters(
    request: Request,
    store: StoreDep,
    provider: Provider,
    workspace: Workspace,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    after: Annotated[str | None, Query(max_length=256, pattern=NO_NUL)] = None,
) -> Response:
    _source(request, provider, workspace)
    letters: list[DeadLetter] = await store.dead_letters(provider, workspace, limit=limit + 1, after=after)
    page = letters[:limit]
    items = [
        DeadLetterItem(
            external_id=letter.external_id,
            reason=letter.reason,
            attempts=letter.attempts,
            last_error=letter.last_error,
            first_failed_at=from_micros(letter.first_failed_at),
            dead_at=from_micros(letter.dead_at),
        )
        for letter in page
    ]
    next_after = page[-1].external_id if len(letters) > limit else None
    return json_response(DeadLetterList(items=items, next_after=next_after))


@router.post(
    "/internal/sources/{provider}/{workspace}/dead-letters/retry",
    response_model=Retried,
    summary="Queue the source's dead letters again",
    responses=UNKNOWN_SOURCE,
)
async def retry_dead_letters(request: Request, store: StoreDep, provider: Provider, workspace: Workspace) -> Response:
    _source(request, provider, workspace)
    retried = await store.retry_dead_letters(provider, workspace)
    if retried and request.app.state.sync is not None:
        request.app.state.sync.wake(provider, workspace)
    return json_response(Retried(retried=retried))
