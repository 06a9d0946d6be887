"""The Zendesk mapper on real payloads: golden files, and the traps SOURCES.md lists, asserted one by one.

Golden files (``tests/providers/zendesk/golden``) are the full internal conversation each case maps to. After a
deliberate mapper change: ``KBMS_UPDATE_GOLDEN=1 pytest tests/providers/zendesk/test_mapper.py``, then review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kbms.errors import ValidationFailed
from kbms.merge import merge, new_state
from kbms.model import Conversation, ConversationDeletion, ConversationSnapshot
from kbms.providers import get_provider
from kbms.providers.zendesk import subdomain
from kbms.render import render
from tests.support.helpers import ZENDESK, ZENDESK_TICKET_EVENTS, zendesk, zendesk_pushes

GOLDEN = Path(__file__).resolve().parent / "golden"
FIXED_ID = "00000000-0000-4000-8000-000000000000"
PUSHES = dict(zendesk_pushes())
ZENDESK_PROVIDER = get_provider("zendesk")
WORKSPACE = "acme"


def pushed(body: dict[str, Any], workspace: str | None = None) -> ConversationSnapshot:
    return ZENDESK_PROVIDER.parse_push(json.dumps(body).encode(), workspace=workspace, default_workspace="default")


def received(name: str, workspace: str | None = WORKSPACE) -> ConversationSnapshot | ConversationDeletion | None:
    hooks = ZENDESK_PROVIDER.webhooks
    assert hooks is not None
    return hooks.parse((ZENDESK / name).read_bytes(), workspace=workspace).change


def rendered(snapshot: object) -> Conversation:
    assert isinstance(snapshot, ConversationSnapshot)
    return render(new_state(FIXED_ID, snapshot))


def check_golden(name: str, conversation: Conversation) -> None:
    got = conversation.model_dump(mode="json")
    path = GOLDEN / f"{name}.json"
    if os.environ.get("KBMS_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n")
    assert got == json.loads(path.read_text())


@pytest.mark.parametrize("name", list(PUSHES))
def test_golden_push(name: str) -> None:
    check_golden(name, rendered(pushed(PUSHES[name])))


@pytest.mark.parametrize("name", ZENDESK_TICKET_EVENTS)
def test_golden_webhook(name: str) -> None:
    check_golden(name.removesuffix(".json"), rendered(received(name)))


def test_golden_webhook_sequence_merges_into_one_ticket() -> None:
    """created, comment_added, status_changed, agent_assignment_changed: one conversation, in any order."""
    names = [n for n in ZENDESK_TICKET_EVENTS if "5158" in (ZENDESK / n).read_text()]
    assert len(names) == 4
    snapshots = [received(name) for name in names]
    results = []
    for order in (snapshots, snapshots[::-1], snapshots[1:] + snapshots[:1]):
        assert all(isinstance(s, ConversationSnapshot) for s in order)
        state = new_state(FIXED_ID, order[0])  # type: ignore[arg-type]
        for snapshot in order[1:]:
            state = merge(state, snapshot).state  # type: ignore[arg-type]
        results.append(render(state).model_dump(exclude={"revision"}))
    assert results[0] == results[1] == results[2]
    check_golden("5158_webhook_sequence", render(state))


def test_ids_arrive_as_integers_and_are_kept_as_strings() -> None:
    conversation = rendered(pushed(PUSHES["04_recorded_ticket_with_admin_user"]))
    assert conversation.external_id == "2251"
    assert conversation.messages[0].id == "288712518088"
    assert conversation.participants[0].id == "21311632247"


def test_roles_come_from_side_loaded_users() -> None:
    # 04: the only user is an admin (the requester, the assignee and the author at once).
    assert [(p.role, p.name) for p in rendered(pushed(PUSHES["04_recorded_ticket_with_admin_user"])).participants] == [
        ("agent", "Facetoe")
    ]
    # 01/02: the comment's author is not side-loaded: unknown (system); the requester is a customer by definition.
    roles = {p.id: p.role for p in rendered(pushed(PUSHES["01_02_docs_ticket_with_comment"])).participants}
    assert roles == {"123123": "system", "20978392": "customer"}
    end_user = zendesk("10_rest_user_show_end_user_go_zendesk.json")["user"]
    body = {**PUSHES["07_new_ticket_with_users"], "users": [{**end_user, "id": 377922500012}]}
    assert [p.role for p in rendered(pushed(body)).participants] == ["customer"]


def test_an_empty_html_body_falls_back_to_body() -> None:
    conversation = rendered(pushed(PUSHES["05_08_email_solved_with_empty_html_bodies"]))
    assert [(m.content, m.content_html) for m in conversation.messages] == [
        ("Mail to create fixture ticket for testing", None)
    ] * 2


def test_html_body_is_kept_and_plain_body_is_the_text() -> None:
    message = rendered(pushed(PUSHES["04_recorded_ticket_with_admin_user"])).messages[0]
    assert (message.content, message.content_html) == (
        "show",
        '<div class="zd-comment"><p dir="auto">show</p></div>',
    )


def test_text_from_html_when_it_is_all_there_is() -> None:
    comment = {"id": 1, "html_body": "<p>Line one<br>Line <b>two</b></p><p>&amp; three</p>", "created_at": 1}
    body = {"ticket": {"id": 9, "created_at": 1}, "comments": [comment]}
    assert rendered(pushed(body)).messages[0].content == "Line one\nLine two\n& three"


def test_private_comments_are_internal() -> None:
    message = rendered(pushed(PUSHES["09_private_note"])).messages[0]
    assert (message.visibility, message.content) == ("internal", "This is a new private comment")


def test_attachments_are_mapped() -> None:
    attachment = rendered(pushed(PUSHES["01_02_docs_ticket_with_comment"])).messages[0].attachments[0]
    assert attachment.model_dump() == {
        "name": "crash.log",
        "url": "https://company.zendesk.com/attachments/crash.log",
        "content_type": "text/plain",
        "size": 2532,
    }


STATUSES = [
    ("new", "open"),
    ("open", "open"),
    ("pending", "pending"),
    ("hold", "pending"),
    ("solved", "solved"),
    ("closed", "closed"),
    ("OPEN", "open"),
    ("HOLD", "pending"),
    ("archived", None),
]


@pytest.mark.parametrize(("status", "state"), STATUSES)
def test_status_to_state(status: str, state: str | None) -> None:
    assert rendered(pushed({"ticket": {"id": 1, "created_at": 1, "status": status}})).state == state


CHANNELS = [
    ("web", "web"),
    ("email", "email"),
    ("web_form", "web"),
    ("mail", "email"),
    ("web_service", "api"),
    (4, "email"),
    (5, "api"),
    ("chat", "chat"),
    (999, None),
]


@pytest.mark.parametrize(("channel", "expected"), CHANNELS)
def test_both_channel_vocabularies_become_one(channel: str | int, expected: str | None) -> None:
    body = {"ticket": {"id": 1, "created_at": 1, "via": {"channel": channel}}}
    assert rendered(pushed(body)).channel == expected


def test_webhook_spelling_is_normalized_like_rest() -> None:
    conversation = rendered(received("21_webhook_ticket_created_docs_copy.json"))
    assert (conversation.state, conversation.channel, conversation.external_id) == ("open", "api", "5158")
    # "time" has nanoseconds; kept to the microsecond.
    assert conversation.events[0].occurred_at.isoformat() == "2025-01-08T10:12:07.672717+00:00"


def test_a_comment_event_is_a_message_by_its_author() -> None:
    conversation = rendered(received("24_webhook_ticket_comment_added_thirdparty_dust.json"))
    assert [(m.id, m.author_participant_id, m.visibility) for m in conversation.messages] == [
        ("9876543210", "8447388090495", "public")
    ]
    assert {p.id: (p.role, p.name) for p in conversation.participants}["8447388090495"] == ("agent", "Support Agent")
    assert conversation.events == ()


def test_other_events_are_events_keyed_by_the_webhook_id() -> None:
    conversation = rendered(received("25_webhook_ticket_status_changed_thirdparty_dust.json"))
    assert [(e.id, e.type, e.provider_type) for e in conversation.events] == [
        ("a8b9c1d2-3e4f-5a6b-7c8d-9e0f1a2b3c4d", "closed", "ticket.status_changed")
    ]
    assert conversation.state == "solved"


def test_permanent_deletion_is_a_tombstone() -> None:
    event = json.loads((ZENDESK / "25_webhook_ticket_status_changed_thirdparty_dust.json").read_text())
    event["type"] = "zen:event-type:ticket.permanently_deleted"
    hooks = ZENDESK_PROVIDER.webhooks
    assert hooks is not None
    change = hooks.parse(json.dumps(event).encode(), workspace=WORKSPACE).change
    assert change == ConversationDeletion(provider="zendesk", workspace=WORKSPACE, external_id="5158")


def test_user_events_are_ignored() -> None:
    assert received("20_webhook_user_active_changed_docs.json") is None


def test_a_webhook_needs_its_workspace() -> None:
    with pytest.raises(ValidationFailed) as raised:
        received("24_webhook_ticket_comment_added_thirdparty_dust.json", workspace=None)
    assert raised.value.issues[0].field == "workspace"


def test_the_workspace_of_a_push() -> None:
    body = PUSHES["01_02_docs_ticket_with_comment"]
    assert pushed(body).workspace == "company"  # from the ticket's url
    assert pushed(body, workspace="other").workspace == "other"  # named by the caller
    staging = {**body, "ticket": {**body["ticket"], "url": "https://x.zendesk-staging.com/api/v2/tickets/1.json"}}
    assert pushed(staging).workspace == "default"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://company.zendesk.com/api/v2/tickets/35436.json", "company"),
        ("https://D3V-Terraform.zendesk.com/api/v2/tickets/4", "d3v-terraform"),
        ("https://zendeskapi.zd-staging.com/api/v2/tickets/1", None),
        ("https://evil.com/company.zendesk.com", None),
        ("https://company.zendesk.com.evil.com/x", None),
        ("not a url", None),
        ("http://[::1/", None),
        (None, None),
    ],
)
def test_subdomain(url: str | None, expected: str | None) -> None:
    assert subdomain(url) == expected


def test_a_ticket_needs_an_id_and_a_creation_time() -> None:
    with pytest.raises(ValidationFailed) as raised:
        pushed({"ticket": {"subject": "no id"}})
    assert {(i.field, i.issue) for i in raised.value.issues} == {
        ("ticket.id", "missing"),
        ("ticket.created_at", "missing"),
    }


def test_comments_without_text_or_attachments_are_not_messages() -> None:
    comments = [
        {"id": 1, "body": "", "html_body": "<p></p>", "created_at": 1},
        {"id": 2, "body": "hi", "created_at": 2},
    ]
    assert [m.id for m in rendered(pushed({"ticket": {"id": 1, "created_at": 1}, "comments": comments})).messages] == [
        "2"
    ]
