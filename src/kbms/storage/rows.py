"""Conversions between stored rows and the merge state. Nothing else in kbms sees a row."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kbms.merge import ConversationState, ParticipantState, Register
from kbms.model import Attachment, Conversation, Event, Message, from_micros, micros
from kbms.render import render, summarize


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def encode_registers(registers: Mapping[str, Register | None]) -> str:
    return dumps({name: [r.version, r.value] for name, r in registers.items() if r is not None})


def decode_registers(text: str) -> dict[str, Register]:
    return {name: Register(version, value) for name, (version, value) in json.loads(text).items()}


def conversation_values(
    state: ConversationState, *, changed_at: int, detail: Conversation | None = None
) -> dict[str, Any]:
    """Every column of a conversations row (but ``pk``), derived from its merge state (``detail``: its render)."""
    detail = detail or render(state)
    summary = summarize(detail)
    return {
        "id": state.id,
        "provider": state.provider,
        "workspace": state.workspace,
        "external_id": state.external_id,
        "created_at": state.created_at,
        "updated_at": state.updated_at,
        "revision": state.revision,
        "subject": detail.subject,
        "state": detail.state,
        "channel": detail.channel,
        "assignee_participant_id": detail.assignee_participant_id,
        "header": encode_registers(state.header),
        "participant_count": summary.participant_count,
        "message_count": summary.message_count,
        "last_message_at": micros(summary.last_message_at) if summary.last_message_at else None,
        "last_message_preview": summary.last_message_preview,
        "detail": detail.model_dump_json(),
        "provider_count": detail.completeness.provider_count,
        "truncated": detail.completeness.truncated,
        "changed_at": changed_at,
        "deleted_at": state.deleted_at,
    }


def participant_values(conversation_pk: int, p: ParticipantState) -> dict[str, Any]:
    current = p.participant()
    return {
        "conversation_pk": conversation_pk,
        "participant_id": p.id,
        "role": current.role,
        "name": current.name,
        "email": current.email,
        "first_seen": p.first_seen,
        "registers": encode_registers({"role": p.role, "name": p.name, "email": p.email}),
    }


def participant_from_row(row: Mapping[Any, Any]) -> ParticipantState:
    registers = decode_registers(row["registers"])
    return ParticipantState(
        id=row["participant_id"],
        first_seen=row["first_seen"],
        role=registers.get("role"),
        name=registers.get("name"),
        email=registers.get("email"),
    )


def message_values(conversation_pk: int, m: Message, version: int) -> dict[str, Any]:
    return {
        "version": version,
        "conversation_pk": conversation_pk,
        "message_id": m.id,
        "author_participant_id": m.author_participant_id,
        "sent_at": micros(m.sent_at),
        "updated_at": micros(m.updated_at) if m.updated_at is not None else None,
        "content": m.content,
        "content_html": m.content_html,
        "visibility": m.visibility,
        "attachments": dumps([a.model_dump() for a in m.attachments]) if m.attachments else "[]",
        "redacted": m.redacted,
        "provider_type": m.provider_type,
    }


def message_from_row(row: Mapping[Any, Any]) -> Message:
    return Message(
        id=row["message_id"],
        author_participant_id=row["author_participant_id"],
        sent_at=from_micros(row["sent_at"]),
        updated_at=from_micros(row["updated_at"]) if row["updated_at"] is not None else None,
        content=row["content"],
        content_html=row["content_html"],
        visibility=row["visibility"],
        attachments=tuple(Attachment(**a) for a in json.loads(row["attachments"]))
        if row["attachments"] != "[]"
        else (),
        redacted=bool(row["redacted"]),
        provider_type=row["provider_type"],
    )


def _attachments(text: str) -> tuple[Attachment, ...]:
    return tuple(Attachment(**a) for a in json.loads(text)) if text != "[]" else ()


def event_values(conversation_pk: int, e: Event) -> dict[str, Any]:
    return {
        "conversation_pk": conversation_pk,
        "event_id": e.id,
        "type": e.type,
        "provider_type": e.provider_type,
        "actor_participant_id": e.actor_participant_id,
        "occurred_at": micros(e.occurred_at),
    }


def event_from_row(row: Mapping[Any, Any]) -> Event:
    return Event(
        id=row["event_id"],
        type=row["type"],
        provider_type=row["provider_type"],
        actor_participant_id=row["actor_participant_id"],
        occurred_at=from_micros(row["occurred_at"]),
    )
