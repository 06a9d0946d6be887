"""Response bodies: the public HTTP contract (additive changes only)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kbms.ingest import IngestOutcome
from kbms.model import Conversation, ConversationSummary, IngestResult, from_micros
from kbms.storage.base import ChangeRecord
from kbms.webhooks import WebhookOutcome

# The detail is served from the read model, which is the model's own JSON: one definition, so the two cannot drift.
# Should the HTTP shape ever need to differ from the model, give it its own class here and a converter.
ConversationDetail = Conversation


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestResponse(_Body):
    id: str = Field(description="kbms's id for the conversation (a UUID)")
    provider: str
    external_id: str
    deduplicated: bool = Field(description="True when the conversation already existed")
    result: IngestResult = Field(description="created (201), updated (200: new data merged), unchanged (200)")

    @classmethod
    def of(cls, outcome: IngestOutcome) -> IngestResponse:
        return cls(
            id=outcome.conversation_id,
            provider=outcome.provider,
            external_id=outcome.external_id,
            deduplicated=outcome.deduplicated,
            result=outcome.result,
        )


class ErrorDetail(_Body):
    field: str = Field(description="Dotted path of the field, e.g. conversation_message.author.id")
    issue: str = Field(description="Machine-readable issue, e.g. missing, string_type, timestamp_range")
    message: str


class ErrorBody(_Body):
    error_code: str
    message: str
    details: list[ErrorDetail] | None = None


class BatchLine(_Body):
    line: int = Field(description="The line's number in the request body (1-based; blank lines count)")
    status: int = Field(description="What pushing this line alone would have answered: 201, 200, 400, 403, 413 or 422")
    result: IngestResult | Literal["rejected"]
    id: str | None = Field(default=None, description="kbms's id for the conversation; null when rejected")
    external_id: str | None = None
    deduplicated: bool | None = Field(default=None, description="True when the conversation already existed")
    error: ErrorBody | None = Field(default=None, description="Why the line was rejected (the documented error body)")


class BatchResponse(_Body):
    provider: str
    lines: int = Field(
        description="Lines in the request body, blank ones included: every result's line is at most this (a final "
        "line break ends the last line, it does not start an empty one)"
    )
    created: int
    updated: int
    unchanged: int
    rejected: int
    results: list[BatchLine] = Field(description="One per non-blank line, in order")


class Match(_Body):
    score: float = Field(description="Relevance: higher is better (comparable within one search only)")
    snippet: str | None = Field(
        description="The first passage holding a searched word: HTML-escaped text, the words in <mark></mark>"
    )
    message_id: str | None = Field(description="The message the snippet comes from; null for the subject")


class ListItem(ConversationSummary):
    match: Match | None = Field(default=None, description="Why a search found it; null outside a search")


class ConversationPage(_Body):
    items: list[ListItem]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page")


class Change(_Body):
    seq: int = Field(description="Commit order: strictly increasing, not necessarily consecutive")
    conversation_id: str
    provider: str
    workspace: str
    external_id: str
    action: Literal["created", "updated", "deleted"]
    revision: int = Field(description="The conversation's revision after this change")
    changed_at: datetime


class ChangePage(_Body):
    items: list[Change]
    next_cursor: str = Field(description="Pass as ?cursor= to continue; always set (repeat it to wait for more)")

    @classmethod
    def of(cls, records: list[ChangeRecord], *, next_cursor: str) -> ChangePage:
        items = [
            Change(
                seq=r.seq,
                conversation_id=r.conversation_id,
                provider=r.provider,
                workspace=r.workspace,
                external_id=r.external_id,
                action=r.action,
                revision=r.revision,
                changed_at=from_micros(r.changed_at),
            )
            for r in records
        ]
        return cls(items=items, next_cursor=next_cursor)


class Health(_Body):
    status: str


class WebhookResponse(_Body):
    provider: str
    delivery_id: str = Field(description="The provider's notification id, or sha256:<hash of the body> without one")
    topic: str | None
    result: Literal["created", "updated", "unchanged", "ignored"] = Field(
        description="What the delivery did; ignored: kept in the ledger, but it carries no conversation"
    )
    conversation_id: str | None
    external_id: str | None
    deduplicated: bool = Field(description="True when this delivery had been received before")

    @classmethod
    def of(cls, outcome: WebhookOutcome) -> WebhookResponse:
        return cls(
            provider=outcome.provider,
            delivery_id=outcome.delivery_id,
            topic=outcome.topic,
            result=outcome.result,
            conversation_id=outcome.conversation_id,
            external_id=outcome.external_id,
            deduplicated=outcome.deduplicated,
        )
