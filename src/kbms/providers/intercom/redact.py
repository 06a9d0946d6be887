"""Redaction in stored raw payloads: once Intercom redacts a part, no copy of its old text stays in the ledger.

Intercom rewrites a redacted part's body in place (``conversation_part.redacted``). kbms overwrites its normalized
copy through the merge; this rewrites the same part inside every raw payload kept for the conversation, pushes
and webhook envelopes alike, including ``translations`` (which carry the text again) and attachments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kbms.model import Message

OPENINGS = ("source", "conversation_message")


def redact(body: bytes, external_id: str, redacted: Mapping[str, Message]) -> bytes | None:
    """``body`` with every part in ``redacted`` replaced by its redacted copy, if ``body`` is a payload of
    conversation ``external_id``; None when nothing had to change (or the body is another conversation's)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # Rejected payloads are kept as received, including ones nested deeper than the json module can recurse
        # (a signed webhook of 5 MB of "[" is one): unreadable, so left as they are rather than failing the
        # delivery that triggered the redaction with a 500.
        return None
    conversation = _conversation(document)
    if conversation is None or _id(conversation.get("id")) != external_id:
        return None
    changed = False
    for key in OPENINGS:
        opening = conversation.get(key)
        if isinstance(opening, dict):
            opening_id = _id(opening.get("id")) or _id(conversation.get("id"))
            if opening_id is not None and opening_id in redacted:
                changed |= _overwrite(opening, redacted[opening_id])
    parts = conversation.get("conversation_parts")
    for part in parts.get("conversation_parts", []) if isinstance(parts, dict) else []:
        part_id = _id(part.get("id")) if isinstance(part, dict) else None
        if part_id is not None and part_id in redacted:
            changed |= _overwrite(part, redacted[part_id])
    return json.dumps(document, ensure_ascii=False).encode() if changed else None


def _conversation(document: Any) -> dict[str, Any] | None:
    if not isinstance(document, dict):
        return None
    if document.get("type") == "notification_event":
        item = (document.get("data") or {}).get("item")
        return item if isinstance(item, dict) else None
    return document


def _id(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value).strip() or None


def _overwrite(part: dict[str, Any], message: Message) -> bool:
    body = message.content_html if message.content_html is not None else message.content
    # Intercom's redaction removes a part's attachments too; names and URLs can say as much as the text.
    attachments = [
        {"type": "upload", "name": a.name, "url": a.url, "content_type": a.content_type, "filesize": a.size}
        for a in message.attachments
    ]
    unchanged = (part.get("body"), part.get("redacted"), part.get("attachments", [])) == (body, True, attachments)
    if unchanged and "translations" not in part:
        return False
    part["body"] = body
    part["redacted"] = True
    part["attachments"] = attachments
    part.pop("translations", None)
    return True
