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
from tests.providers import SAMPLES

WITH_WEBHOOKS = [name for name, provider in REGISTRY.items() if provider.webhooks is not None]
DELIVERIES = [
    pytest.param(provider, path, id=path.name)
    for provider in WITH_WEBHOOKS
    for path in SAMPLES[provider].recorded_deliveries()
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


@pytest.mark.parametrize("provider", WITH_WEBHOOKS)
def test_the_documented_deliveries_tell_topics_apart(provider: str) -> None:
    # The provider's own cases (tests/providers/<name>/samples.py): a topic whose item kbms must be able to read
    # is documented as needing it; one whose item kbms ignores is not.
    schema = documented(provider)
    cases = SAMPLES[provider].documented_deliveries
    assert cases
    assert [(delivery, schema.is_valid(delivery)) for delivery, _ in cases] == list(cases)


@given(st.text(max_size=MAX_ID))
def test_a_string_id_is_accepted_exactly_when_documented(text: str) -> None:
    # The document spells out str.strip()'s whitespace: other regex engines read "\s" differently.
    try:
        TypeAdapter(Id).validate_python(text)
        accepted = True
    except ValidationError:
        accepted = False
    assert ID_SCHEMA.is_valid(text) == accepted


def test_the_document_lists_paths_as_the_routers_are_listed_not_as_they_are_matched(tmp_path: Path) -> None:
    """Routes are matched busiest first (reads, ingestion) and the console's last; the document keeps the order of
    ``create_app``'s routers: health, metrics, ingestion, webhooks, reads, sources."""
    from kbms.api import create_app
    from kbms.settings import Settings

    paths = list(create_app(Settings(database_url=f"sqlite:///{tmp_path}/kbms.db")).openapi()["paths"])
    firsts = ["/health", "/metrics", "/integrations/intercom/conversations", "/webhooks/intercom"]
    assert [p for p in paths if p in firsts] == firsts
    assert paths.index("/webhooks/intercom") < paths.index("/internal/conversations") < paths.index("/internal/sources")
