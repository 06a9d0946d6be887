"""The OpenAPI document's request schemas are promises: what they accept, kbms accepts (tests/api/test_fuzz.py holds the
API to them with generated data); here, recorded provider payloads and the id rule, checked directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from kbms.providers import REGISTRY
from kbms.providers.fields import MAX_ID, Id
from tests.support.helpers import INTERCOM, ZENDESK

DELIVERIES = [
    pytest.param(provider, path, id=path.name)
    for provider, folder in (("intercom", INTERCOM), ("zendesk", ZENDESK))
    for path in sorted(folder.glob("*_webhook_*.json"))
]
ID_SCHEMA = jsonschema_rs.Draft202012Validator(TypeAdapter(Id).json_schema())


def documented(provider: str) -> Any:
    webhooks = REGISTRY[provider].webhooks
    assert webhooks is not None
    return jsonschema_rs.Draft202012Validator(webhooks.delivery_schema())


@pytest.mark.parametrize(("provider", "path"), DELIVERIES)
def test_recorded_deliveries_are_documented(provider: str, path: Path) -> None:
    # Narrower than what is accepted is allowed; too narrow for what providers really send would be useless.
    delivery = json.loads(path.read_text())
    errors = [error.message for error in documented(provider).iter_errors(delivery)]
    assert errors == []


def test_the_documented_deliveries_tell_topics_apart() -> None:
    intercom, zendesk = documented("intercom"), documented("zendesk")
    conversation = {"type": "conversation", "id": "1"}  # no created_at: not a conversation kbms can read
    assert not intercom.is_valid({"topic": "conversation.user.replied", "data": {"item": conversation}})
    assert intercom.is_valid({"topic": "conversation.deleted", "data": {"item": conversation}})
    assert intercom.is_valid({"topic": "contact.created", "data": {"item": {"type": "contact"}}})
    assert not zendesk.is_valid({"type": "zen:event-type:ticket.comment_added", "detail": {"id": "1"}, "time": 0})
    assert zendesk.is_valid({"type": "zen:event-type:ticket.permanently_deleted", "detail": {"id": "1"}})
    assert zendesk.is_valid({"type": "zen:event-type:user.created", "detail": None})


@given(st.text(max_size=MAX_ID))
def test_a_string_id_is_accepted_exactly_when_documented(text: str) -> None:
    # The document spells out str.strip()'s whitespace: other regex engines read "\s" differently.
    try:
        TypeAdapter(Id).validate_python(text)
        accepted = True
    except ValidationError:
        accepted = False
    assert ID_SCHEMA.is_valid(text) == accepted
