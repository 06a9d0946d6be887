"""Size caps on what one payload may hold, checked on the normalized snapshot so they mean the same for every
provider.

The body size limit (413) bounds a payload's bytes; these bound its shape: how many parts, how long a message.
They are intake limits, like the body size: a payload over one is refused (422, ``validation_error``) and not
kept in the ledger, so ``kbms reprocess`` never turns such a refusal into a stored conversation behind the
operator's back. Issue names are pydantic's (``too_long``, ``string_too_long``).

JSON nesting depth is bounded before any of this, by pydantic-core's parser (``MAX_DEPTH`` in
``providers/base.py``): it refuses deeper documents in Rust, without recursing on Python's stack, so no depth of
nesting can exhaust it. A lower, configurable depth was measured and not adopted: finding the depth of a body
without parsing it cost 9 us per payload on the benchmark corpus and 300 us for 20 KB ones (bytes.translate and
re), a tenth to a whole of what validating it costs, for no protection that the parser's bound does not give.
"""

from __future__ import annotations

from dataclasses import dataclass

from kbms.errors import FieldIssue, LimitExceeded
from kbms.model import Change, ConversationSnapshot, Message
from kbms.settings import Settings


@dataclass(frozen=True, slots=True)
class PayloadLimits:
    """The caps; the defaults are ``Settings``'s."""

    max_parts: int = 10_000
    max_list_items: int = 1_000
    max_message_chars: int = 1_048_576
    max_field_chars: int = 8_192

    @classmethod
    def of(cls, settings: Settings) -> PayloadLimits:
        return cls(
            max_parts=settings.max_parts,
            max_list_items=settings.max_list_items,
            max_message_chars=settings.max_message_chars,
            max_field_chars=settings.max_field_chars,
        )


DEFAULT_LIMITS = PayloadLimits()


def enforce(change: Change | None, limits: PayloadLimits) -> None:
    """Raise ``LimitExceeded``, naming the fields over their caps (the first ``MAX_REPORTED``), if ``change``
    exceeds ``limits``."""
    if not isinstance(change, ConversationSnapshot):
        return  # deletions and ignored deliveries carry nothing to bound
    issues = _issues(change, limits)
    if issues:
        raise LimitExceeded(issues[:MAX_REPORTED])


MAX_REPORTED = 20


def _issues(snapshot: ConversationSnapshot, limits: PayloadLimits) -> list[FieldIssue]:
    # Inline comparisons, field names built only for what fails: this runs for every ingested payload (5-9 us of
    # CPU for a benchmark-corpus conversation, against 230-320 us to validate and map it; a first version with a
    # helper call and a tuple per field took about three times as long).
    issues: list[FieldIssue] = []
    short, long, items = limits.max_field_chars, limits.max_message_chars, limits.max_list_items
    parts = len(snapshot.messages) + len(snapshot.events)
    if parts > limits.max_parts:
        issues.append(_too_many("messages", parts, limits.max_parts, "messages and events"))
    if len(snapshot.participants) > limits.max_parts:
        issues.append(_too_many("participants", len(snapshot.participants), limits.max_parts, "participants"))
    header = snapshot.header
    if len(header.tags) > items:
        issues.append(_too_many("tags", len(header.tags), items, "tags"))
    if header.subject is not None and len(header.subject) > short:
        issues.append(_too_long("subject", header.subject, short))
    if header.channel is not None and len(header.channel) > short:
        issues.append(_too_long("channel", header.channel, short))
    issues.extend(_too_long("tags", tag, short) for tag in header.tags if len(tag) > short)
    for person in snapshot.participants:
        if person.name is not None and len(person.name) > short:
            issues.append(_too_long(f"participants.{person.id}.name", person.name, short))
        if person.email is not None and len(person.email) > short:
            issues.append(_too_long(f"participants.{person.id}.email", person.email, short))
    for message in snapshot.messages:
        if len(message.content) > long:
            issues.append(_too_long(f"messages.{message.id}.content", message.content, long))
        html = message.content_html
        if html is not None and len(html) > long:
            issues.append(_too_long(f"messages.{message.id}.content_html", html, long))
        kind = message.provider_type
        if kind is not None and len(kind) > short:
            issues.append(_too_long(f"messages.{message.id}.provider_type", kind, short))
        if message.attachments:
            issues.extend(_attachment_issues(message, items, short))
    for event in snapshot.events:
        if event.provider_type is not None and len(event.provider_type) > short:
            issues.append(_too_long(f"events.{event.id}.provider_type", event.provider_type, short))
    return issues


def _attachment_issues(message: Message, items: int, short: int) -> list[FieldIssue]:
    where = f"messages.{message.id}.attachments"
    issues = []
    if len(message.attachments) > items:
        issues.append(_too_many(where, len(message.attachments), items, "attachments"))
    for attachment in message.attachments:
        named = (("name", attachment.name), ("url", attachment.url), ("content_type", attachment.content_type))
        for field, text in named:
            if text is not None and len(text) > short:
                issues.append(_too_long(f"{where}.{field}", text, short))
    return issues


def _too_many(field: str, count: int, cap: int, what: str) -> FieldIssue:
    return FieldIssue(field, "too_long", f"A payload may carry at most {cap} {what}; this one has {count}")


def _too_long(field: str, text: str | None, cap: int) -> FieldIssue:
    return FieldIssue(field, "string_too_long", f"At most {cap} characters; this has {len(text or '')}")
