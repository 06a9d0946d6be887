"""The console's pages (GET): thin, each a few store reads rendered by a template. Filters are read with the
API's own validators, after dropping the empty fields a GET form sends, so a page answers a bad value as the API
does (its message, a 4xx), and a workspace-limited key sees exactly what the API shows it."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, get_args
from urllib.parse import urlencode

from fastapi import Request, Response
from pydantic import StringConstraints, TypeAdapter

from kbms import search
from kbms.api.bounds import TIME
from kbms.api.console.common import base_context, console_of, forbidden_workspace, take_flash, viewer, with_flash_taken
from kbms.api.console.views import chart, render
from kbms.api.conversations import CURSOR_PARAMETER, Q_PARAMETER, filters_of
from kbms.api.cursor import decode_cursor, decode_search_cursor, encode_cursor, encode_search_cursor
from kbms.api.lean import WORKSPACE_QUERY, Query, path_id, query, store_of
from kbms.api.sources import status_of
from kbms.errors import FieldIssue, NotFound, ValidationFailed
from kbms.model import CONVERSATION_ID, State, micros
from kbms.storage.base import DeliveryRecord

PAGE = 50
DELIVERIES = 100
PAYLOAD_CHARS = 64 * 1024  # of a raw payload shown on a page (the ledger keeps it whole)
FORM_FIELDS = ("q", "provider", "workspace", "state", "tag", "updated_after", "updated_before", "cursor")
REJECT_FIELDS = ("provider", "workspace", "since", "cursor")
SINCE = Query("since", TIME, None, "Received at or after this time")
REJECT_CURSOR = TypeAdapter(Annotated[str, StringConstraints(pattern=r"^[0-9]{1,18}-[0-9]{1,18}$")])


def given(request: Request, names: tuple[str, ...]) -> Request:
    """The request without the empty fields a GET form sends (an empty filter is no filter), nor unknown ones."""
    kept = [(k, v) for k, v in request.query_params.multi_items() if k in names and v != ""]
    scope = {**request.scope, "query_string": urlencode(kept).encode()}
    return Request(scope, request.receive)


def shown(record: DeliveryRecord) -> dict[str, Any]:
    """A ledger row for a page, its raw payload as text (indented when it is JSON), cut at ``PAYLOAD_CHARS``."""
    text = record.body.decode("utf-8", "replace")
    with contextlib.suppress(ValueError):
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    if len(text) > PAYLOAD_CHARS:
        text = text[:PAYLOAD_CHARS] + f"\n… (cut here; {len(record.body):,} bytes in the ledger)"
    names = ("pk", "provider", "workspace", "kind", "topic", "received_at", "outcome", "error")
    return {**{name: getattr(record, name) for name in names}, "payload": text}


async def overview(request: Request) -> Response:
    who = viewer(request)
    now = micros(datetime.now(UTC))
    tally = await console_of(request).tally.overview(store_of(request), who.workspaces, now=now)
    context = base_context(request, "Overview", active="overview")
    context.update(
        counts=tally.counts, chart=chart(tally.minutes, since=tally.since), since=tally.since, until=tally.until
    )
    context["sources"] = await source_statuses(request)
    return render(console_of(request).env, "overview.html", context)


async def source_statuses(request: Request) -> list[Any]:
    configured = [s for s in request.app.state.sources if visible(request, s.workspace)]
    if not configured:
        return []
    states = {(s.provider, s.workspace): s for s in await store_of(request).sync_states()}
    return [status_of(states.get((s.provider, s.workspace)), s) for s in configured]


def visible(request: Request, workspace: str) -> bool:
    within = viewer(request).workspaces
    return within is None or workspace in within


async def conversations(request: Request) -> Response:
    clean = given(request, FORM_FIELDS)
    filters = filters_of(clean)
    q = Q_PARAMETER.read(clean)
    cursor = CURSOR_PARAMETER.read(clean)
    store = store_of(request)
    items: list[dict[str, Any]] = []
    following: str | None = None
    if q is not None:
        terms = search.query_terms(q)
        if not terms:
            issue = FieldIssue("q", "no_words", "The query has no word to search for (letters or digits)")
            raise ValidationFailed([issue], message="Bad search")
        offset = decode_search_cursor(cursor) if cursor else 0
        if offset > search.WINDOW:
            issue = FieldIssue("cursor", "too_deep", f"Search results stop after {search.WINDOW}")
            raise ValidationFailed([issue], message="Bad cursor")
        hits = await store.search(terms, filters=filters, limit=PAGE + 1, offset=offset)
        items = [{"summary": hit.summary, "snippet": hit.snippet} for hit in hits[:PAGE]]
        following = encode_search_cursor(offset + PAGE) if len(hits) > PAGE else None
    else:
        page = await store.list_conversations(
            limit=PAGE, cursor=decode_cursor(cursor) if cursor else None, filters=filters
        )
        items = [{"summary": item, "snippet": None} for item in page.items]
        following = encode_cursor(page.next_cursor) if page.next_cursor is not None else None
    params = dict(clean.query_params)
    next_url = None
    if following is not None:
        next_url = "/console/conversations?" + urlencode({**params, "cursor": following})
    context = base_context(request, "Conversations", active="conversations")
    context.update(
        items=items,
        searching=q is not None,
        params=params,
        providers=list(request.app.state.providers),
        states=get_args(State),
        next_url=next_url,
    )
    return render(console_of(request).env, "conversations.html", context)


async def conversation(request: Request) -> Response:
    conversation_id = path_id(request, "conversation_id", CONVERSATION_ID, "Conversation")
    store = store_of(request)
    raw = await store.get_conversation_json(conversation_id, within=viewer(request).workspaces)
    if raw is None:
        raise NotFound("Conversation not found")
    detail = json.loads(raw)
    people = {p["id"]: p for p in detail.get("participants", [])}

    def who(participant_id: str | None) -> str:
        person = people.get(participant_id or "")
        if person is None:
            return participant_id or "unknown"
        return f"{person.get('name') or person.get('email') or person['id']} ({person.get('role')})"

    timeline: list[dict[str, Any]] = []
    for m in detail.get("messages", []):
        timeline.append(
            {
                "kind": "message",
                "at": m.get("sent_at"),
                "author": who(m.get("author_participant_id")),
                "visibility": "internal" if m.get("visibility") == "internal" else "public",
                "text": m.get("content") or "",
                "redacted": m.get("redacted"),
                "attachments": m.get("attachments") or [],
            }
        )
    for e in detail.get("events", []):
        timeline.append(
            {
                "kind": "event",
                "at": e.get("occurred_at"),
                "author": who(e.get("actor_participant_id")),
                "type": e.get("type"),
                "provider_type": e.get("provider_type"),
            }
        )
    # Stable: messages before events at the same instant, each in the detail's own order.
    timeline.sort(key=lambda entry: entry["at"] or "")
    records = await store.conversation_deliveries(conversation_id, limit=DELIVERIES)
    heading = detail.get("subject") or f"Conversation {detail.get('external_id', conversation_id)}"
    context = base_context(request, heading, active="conversations")
    context.update(
        c=detail,
        assignee=who(detail["assignee_participant_id"]) if detail.get("assignee_participant_id") else None,
        completeness=detail.get("completeness"),
        timeline=timeline,
        deliveries=[shown(r) for r in records],
        deliveries_capped=len(records) == DELIVERIES,
    )
    return render(console_of(request).env, "conversation.html", context)


async def rejects(request: Request) -> Response:
    clean = given(request, REJECT_FIELDS)
    provider = None
    if "provider" in clean.query_params:
        provider = query(clean, "provider", request.app.state.provider_filter, None)
    workspace = WORKSPACE_QUERY.read(clean)
    within = viewer(request).workspaces
    if within is not None and workspace is not None and workspace not in within:
        raise forbidden_workspace(workspace)
    since = SINCE.read(clean)
    cursor = query(clean, "cursor", REJECT_CURSOR, None)
    at, _, pk = cursor.partition("-") if cursor is not None else ("", "", "")
    rows = await store_of(request).rejected_deliveries(
        provider=provider,
        workspace=workspace,
        within=within,
        since=micros(since) if since is not None else None,
        before=(int(at), int(pk)) if cursor is not None else None,
        limit=PAGE + 1,
    )
    params = dict(clean.query_params)
    next_url = None
    if len(rows) > PAGE:
        last = rows[PAGE - 1]
        next_url = "/console/rejects?" + urlencode({**params, "cursor": f"{last.received_at}-{last.pk}"})
    context = base_context(request, "Rejects", active="rejects")
    context.update(
        rows=[shown(r) for r in rows[:PAGE]],
        params=params,
        providers=list(request.app.state.providers),
        next_url=next_url,
        may_reprocess_all=viewer(request).workspaces is None,
        outcome=take_flash(request),
    )
    return with_flash_taken(request, render(console_of(request).env, "rejects.html", context))


async def sources(request: Request) -> Response:
    if not request.app.state.sources:
        raise NotFound("No sources are configured (KBMS_SOURCES)")
    context = base_context(request, "Sources", active="sources")
    context.update(sources=await source_statuses(request), outcome=take_flash(request))
    return with_flash_taken(request, render(console_of(request).env, "sources.html", context))


async def unknown(request: Request) -> Response:
    raise NotFound("No such console page")
