"""Intercom's conversation object, read tolerantly: only what kbms maps is declared, the rest is ignored.

Both API shapes are accepted: 1.x puts the opening message in ``conversation_message``, 2.x in ``source``
(webhooks follow the app's API version, so both arrive). The original design's required subset applies to
whichever is present: ``id``, ``created_at``, the opening message's ``body`` and ``author.id``. When neither is
present the error names ``conversation_message``, as the original design does. Parts need an ``id``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from kbms.providers.fields import Id, Integer, OptionalCount, OptionalId, OptionalText, Timestamp


class _Tolerant(BaseModel):
    # Unknown fields are accepted and not kept: the raw payload is in the ledger, and keeping them (extra="allow")
    # made validation twice as slow (213 vs 111 us for a 5 KB conversation).
    model_config = ConfigDict(extra="ignore", frozen=True)


class IntercomAuthor(_Tolerant):
    """An author whose id is required (the opening message's)."""

    id: Id
    type: OptionalText = None
    name: OptionalText = None
    email: OptionalText = None


class IntercomPerson(_Tolerant):
    """A part's author, an assignee or a contact: nothing required (``nobody_admin`` has ``id: null``)."""

    id: OptionalId = None
    type: OptionalText = None
    name: OptionalText = None
    email: OptionalText = None


class IntercomAttachment(_Tolerant):
    name: OptionalText = None
    url: OptionalText = None
    content_type: OptionalText = None
    filesize: Integer | None = None


class IntercomOpeningMessage(_Tolerant):
    """``conversation_message`` (1.x) or ``source`` (2.x): the message that opened the conversation."""

    id: OptionalId = None
    type: OptionalText = None
    subject: str | None = None
    body: str
    author: IntercomAuthor
    attachments: list[IntercomAttachment] | None = None
    redacted: bool | None = None


class IntercomPart(_Tolerant):
    id: Id
    part_type: OptionalText = None
    body: str | None = None
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    author: IntercomPerson | None = None
    attachments: list[IntercomAttachment] | None = None
    redacted: bool | None = None


class IntercomPartList(_Tolerant):
    conversation_parts: list[IntercomPart] = Field(default_factory=list)
    # A retrieve's count of all the conversation's parts, of which it returns at most the 500 newest; a webhook's
    # counts only the parts it carries (fixtures/SOURCES.md).
    total_count: OptionalCount = None


class IntercomStatistics(_Tolerant):
    # Every part and the opening message (fixtures/SOURCES.md); webhooks carry it too.
    count_conversation_parts: OptionalCount = None


class IntercomTag(_Tolerant):
    name: OptionalText = None


class IntercomTagList(_Tolerant):
    tags: list[IntercomTag] = Field(default_factory=list)


class IntercomContactList(_Tolerant):
    contacts: list[IntercomPerson] = Field(default_factory=list)


class IntercomChannel(_Tolerant):
    initial: OptionalText = None
    current: OptionalText = None


class IntercomConversationItem(_Tolerant):
    """A conversation as a webhook's ``data.item`` carries it: some topics send a minimal item, without the
    opening message (``conversation.read`` in fixture 10), and it still says something about the conversation."""

    id: Id
    created_at: Timestamp
    updated_at: Timestamp | None = None
    source: IntercomOpeningMessage | None = None
    conversation_message: IntercomOpeningMessage | None = None
    conversation_parts: IntercomPartList | None = None
    statistics: IntercomStatistics | None = None
    state: OptionalText = None
    open: bool | None = None
    title: str | None = None
    tags: IntercomTagList | None = None
    channel: IntercomChannel | None = None
    # 2.x assignees are bare ids; 1.x carries an admin object (``nobody_admin`` when unassigned).
    admin_assignee_id: OptionalId = None
    team_assignee_id: OptionalId = None
    assignee: IntercomPerson | None = None
    contacts: IntercomContactList | None = None
    customers: list[IntercomPerson] | None = None
    user: IntercomPerson | None = None

    @field_validator("statistics", mode="before")
    @classmethod
    def _statistics(cls, value: Any) -> Any:
        # Only a count is read from it, and a count never refuses a payload (``OptionalCount``).
        return value if isinstance(value, dict) else None

    @property
    def opening(self) -> IntercomOpeningMessage | None:
        return self.source or self.conversation_message

    @property
    def parts(self) -> list[IntercomPart]:
        return self.conversation_parts.conversation_parts if self.conversation_parts else []


class IntercomConversation(IntercomConversationItem):
    """A conversation pushed to kbms, as ``GET /conversations/{id}`` returns it: the opening message is required."""

    # The validator below, as JSON Schema: OpenAPI then promises only what is accepted.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["source"], "properties": {"source": {"type": "object"}}},
                {"required": ["conversation_message"], "properties": {"conversation_message": {"type": "object"}}},
            ]
        }
    )

    # Redeclared so that it is validated after ``source`` (and can see it), even when absent.
    conversation_message: IntercomOpeningMessage | None = Field(default=None, validate_default=True)

    @field_validator("conversation_message")
    @classmethod
    def _opening_message_required(
        cls, value: IntercomOpeningMessage | None, info: ValidationInfo
    ) -> IntercomOpeningMessage | None:
        # An absent (or null) ``source`` is in ``info.data`` as None; one that failed its own validation is not
        # there at all, and must not be reported a second time as "missing".
        if value is None and "source" in info.data and info.data["source"] is None:
            raise PydanticCustomError("missing", "Field required")
        return value


class IntercomNotificationData(_Tolerant):
    item: dict[str, Any] | None = None


class IntercomNotification(_Tolerant):
    """The webhook envelope (``type: notification_event``); the item is validated once its kind is known."""

    id: OptionalId = None
    topic: OptionalText = None
    app_id: OptionalText = None
    data: IntercomNotificationData | None = None
