"""The read model a consumer sees, made from a merged state: a conversation's detail and its list item.

Merging (``kbms.merge``) decides what is stored; this decides how it reads. The orders it sorts by depend only on
the stored content (times, then provider ids), never on the order deliveries arrived in, so every replica renders
the same detail.
"""

from __future__ import annotations

from typing import Any

from kbms.merge import ConversationState
from kbms.model import Completeness, Conversation, ConversationSummary, Message, from_micros, micros

PREVIEW_CHARS = 120


def id_order(value: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order (Intercom and Zendesk ids grow with creation), then the rest as text."""
    if value.isascii() and value.isdigit():
        return (0, len(value.lstrip("0")), value.lstrip("0"))
    return (1, 0, value)


def ordered_messages(state: ConversationState) -> list[Message]:
    """The opening message first, then by time; parts sharing a second keep the provider's id order.

    Sorting by the provider id rather than by arrival keeps the order the same whatever order deliveries came in.
    """
    opening = state.header.get("opening_message_id")
    opening_id = opening.value if opening is not None else None
    return sorted(
        state.messages.values(),
        key=lambda m: (m.id != opening_id, micros(m.sent_at), id_order(m.id)),
    )


def render(state: ConversationState) -> Conversation:
    """The consumer-facing detail of a stored conversation."""

    def value(name: str, default: Any = None) -> Any:
        register = state.header.get(name)
        return register.value if register is not None else default

    # Validated, although every part already is: pydantic validates in Rust, and measured faster than its
    # Python-level model_construct (3.6 vs 4.5 us for a Message).
    return Conversation(
        id=state.id,
        provider=state.provider,
        external_id=state.external_id,
        workspace=state.workspace,
        created_at=from_micros(state.created_at),
        updated_at=from_micros(state.updated_at),
        participants=tuple(
            p.participant() for p in sorted(state.participants.values(), key=lambda p: (p.first_seen, id_order(p.id)))
        ),
        messages=tuple(ordered_messages(state)),
        subject=value("subject"),
        state=value("state"),
        tags=tuple(value("tags", ())),
        assignee_participant_id=value("assignee_participant_id"),
        channel=value("channel"),
        events=tuple(sorted(state.events.values(), key=lambda e: (micros(e.occurred_at), id_order(e.id)))),
        revision=state.revision,
        completeness=completeness(state),
    )


def completeness(state: ConversationState) -> Completeness:
    """What the newest payload that said so counts, against what is stored, in the unit that payload counted."""
    registers = state.header
    count = registers.get("provider_count")
    truncated = registers.get("truncated")
    counted = registers.get("counted")
    if counted is not None and counted.value == "items":
        stored = len(state.messages.keys() | state.events.keys())
    else:
        stored = len(state.messages)
    return Completeness(
        provider_count=count.value if count is not None else None,
        stored_count=stored,
        truncated=bool(truncated.value) if truncated is not None else False,
    )


def preview(content: str) -> str:
    """One line of at most ``PREVIEW_CHARS`` characters; an ellipsis says it was cut."""
    line = " ".join(content.split())
    if len(line) <= PREVIEW_CHARS:
        return line
    return line[: PREVIEW_CHARS - 1].rstrip() + "…"


def summarize(conversation: Conversation) -> ConversationSummary:
    """The list item of a conversation detail."""
    last = conversation.messages[-1] if conversation.messages else None
    return ConversationSummary(
        id=conversation.id,
        provider=conversation.provider,
        external_id=conversation.external_id,
        workspace=conversation.workspace,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        participant_count=len(conversation.participants),
        message_count=len(conversation.messages),
        last_message_at=last.sent_at if last is not None else None,
        last_message_preview=preview(last.content) if last is not None else None,
        subject=conversation.subject,
        state=conversation.state,
    )
