"""Opaque page cursors. Clients pass them back verbatim; their content may change between versions."""

from __future__ import annotations

import base64
import binascii
import re

from kbms.errors import FieldIssue, ValidationFailed
from kbms.storage.base import Cursor

PREFIX = "v1"
MAX_INT = 2**63
ID = re.compile(r"[0-9a-f-]{36}")


def encode_cursor(cursor: Cursor) -> str:
    raw = f"{PREFIX}:{cursor.updated_at}:{cursor.conversation_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        prefix, updated_at, conversation_id = raw.split(":")
        cursor = Cursor(updated_at=int(updated_at), conversation_id=conversation_id)
        # Database integers are 64-bit: a forged cursor must not become an overflow (a 500) downstream.
        if prefix != PREFIX or not 0 <= cursor.updated_at < MAX_INT or not ID.fullmatch(conversation_id):
            raise ValueError(raw)
        return cursor
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise ValidationFailed(
            [FieldIssue("cursor", "invalid_cursor", "Not a cursor returned by this API")],
            message="Request validation failed",
        ) from None
