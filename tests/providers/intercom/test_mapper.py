"""The Intercom mapper on real payloads: golden files, and the traits SOURCES.md describes, asserted one by one.

Golden files are the full internal conversation each fixture maps to (``tests/providers/intercom/golden``). After a
deliberate mapper change, regenerate them with ``KBMS_UPDATE_GOLDEN=1 pytest tests/providers/intercom/test_mapper.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kbms.merge import new_state
from kbms.model import Conversation
from kbms.providers import get_provider
from kbms.render import render
from tests.support.helpers import airbyte_conversation_with_parts, intercom_conversations, load

GOLDEN = Path(__file__).resolve().parent / "golden"
FIXED_ID = "00000000-0000-4000-8000-000000000000"
CASES = list(intercom_conversations())


def to_conversation(payload: dict[str, Any], workspace: str = "default") -> Conversation:
    snapshot = get_provider("intercom").parse_push(
        json.dumps(payload).encode(), workspace=workspace, default_workspace="default"
    )
    return render(new_state(FIXED_ID, snapshot))


def by_name(name: str) -> Conversation:
    for case, workspace, payload in CASES:
        if case == name:
            return to_conversation(payload, workspace)
    raise KeyError(name)


@pytest.mark.parametrize(("name", "workspace", "payload"), CASES, ids=[c[0] for c in CASES])
def test_golden(name: str, workspace: str, payload: dict[str, Any]) -> None:
    got = to_conversation(payload, workspace).model_dump(mode="json")
    path = GOLDEN / f"{name}.json"
    if os.environ.get("KBMS_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n")
    assert got == json.loads(path.read_text())


def test_every_conversation_fixture_has_a_case() -> None:
    # 15 fixtures carry a whole conversation (the webhook-only 10, 11, 12 and 19 do not), plus Airbyte's records.
    assert len({name for name, _, _ in CASES}) == 16


def test_opening_message_comes_first_even_when_parts_are_older() -> None:
    # Spec example: part 1 is dated 2022, the conversation 2024.
    conversation = by_name("01_rest_get_conversation_v2.16")
    assert [m.id for m in conversation.messages] == ["403918334", "1"]
    assert conversation.messages[0].provider_type == "conversation_message"
    assert conversation.messages[1].sent_at < conversation.messages[0].sent_at


def test_parts_without_body_are_events_not_messages() -> None:
    conversation = by_name("01_rest_get_conversation_v2.16")
    assert [(e.id, e.type, e.provider_type) for e in conversation.events] == [
        ("2", "other", "custom_action_started"),
        ("3", "other", "conversation_attribute_updated_by_admin"),
        ("4", "other", "custom_action_finished"),
    ]


def test_integer_ids_become_strings() -> None:
    conversation = by_name("01_rest_get_conversation_v2.16")
    assert conversation.messages[1].id == "1"
    assert conversation.assignee_participant_id == "991267715"  # admin_assignee_id arrives as an integer


def test_notes_are_internal_and_html_becomes_text() -> None:
    note = by_name("06_rest_admin_note_html_v2.16").messages[1]
    assert note.visibility == "internal"
    assert note.content == ("An Unordered HTML List\nCoffee\nTea\nMilk\nAn Ordered HTML List\nCoffee\nTea\nMilk")
    assert note.content_html is not None
    assert note.content_html.startswith("<h2>")


def test_customer_text_inside_an_open_part_is_a_message_and_an_event() -> None:
    conversation = by_name("07_rest_user_reply_reopens_part_type_open_v2.16")
    assert [(m.id, m.content, m.visibility) for m in conversation.messages][1] == ("132", "Thanks again :)", "public")
    assert [(e.id, e.type) for e in conversation.events] == [("132", "opened")]


def test_reply_inside_an_assignment_part_is_a_message_and_an_event() -> None:
    conversation = by_name("17_webhook_conversation_admin_replied_assignment_with_body_legacy_v1_zulip")
    assert [m.content for m in conversation.messages] == ["Hello", "Hey Eeshan! How can I help?"]
    assert [(e.id, e.type, e.actor_participant_id) for e in conversation.events] == [
        ("2824382500", "assigned", "1957471")
    ]
    admin = next(p for p in conversation.participants if p.id == "1957471")
    assert admin.role == "agent"
    assert admin.email == "cordelia@zulip.com"  # the assignee object has it; the part author has none


def test_assign_and_reopen_without_body_is_only_an_event() -> None:
    conversation = by_name("05_rest_assign_and_reopen_v2.16")
    assert [m.id for m in conversation.messages] == ["403918361"]
    assert [(e.type, e.provider_type) for e in conversation.events] == [("assigned", "assign_and_reopen")]


def test_redacted_part_keeps_its_replacement_text_and_flag() -> None:
    message = by_name("15_webhook_conversation_part_redacted_2026_zulip").messages[1]
    assert message.redacted is True
    assert message.content == "This message was deleted"
    assert message.updated_at is not None
    assert message.updated_at > message.sent_at


def test_null_bodies_skipped_and_order_kept_when_parts_share_a_second() -> None:
    conversation = by_name("14_webhook_conversation_read_multi_parts_2026_zulip")
    assert [m.id for m in conversation.messages] == ["3381828792", "37358121213", "37358121359"]
    assert conversation.messages[1].sent_at == conversation.messages[2].sent_at
    assert {e.provider_type for e in conversation.events} == {"language_detection_details", "attribute_collector"}


def test_priority_change_is_an_event() -> None:
    conversation = by_name("16_webhook_conversation_priority_updated_body_null_2026_zulip")
    assert [(e.type, e.actor_participant_id) for e in conversation.events] == [("priority_changed", "9608799")]
    assert len(conversation.messages) == 1


def test_empty_strings_are_null_and_unassigned_is_none() -> None:
    conversation = by_name("18_webhook_conversation_user_created_legacy_v1_zulip")
    assert conversation.assignee_participant_id is None  # {"type": "nobody_admin", "id": null}
    lead = conversation.participants[0]
    assert (lead.role, lead.name, lead.email) == ("customer", "Rose Poodle from St. John's", None)
    assert conversation.events == ()


def test_null_admin_assignee_is_unassigned() -> None:
    assert by_name("08_rest_merged_conversation_v2.16").assignee_participant_id is None


def test_email_subject_html_is_text_and_lead_is_customer() -> None:
    conversation = by_name("03_rest_get_email_conversation_preview")
    assert conversation.subject == "Re: Bug query"
    assert conversation.channel == "messenger"
    assert next(p for p in conversation.participants if p.id == "991267645").role == "customer"


def test_call_summary_by_a_bot_is_a_message() -> None:
    conversation = by_name("02_rest_get_conversation_preview_call_summary_translations")
    summary = conversation.messages[-1]
    assert (summary.provider_type, summary.author_participant_id) == ("call_summary", "278")
    assert next(p for p in conversation.participants if p.id == "278").role == "bot"


def test_lead_in_source_and_user_in_parts_is_one_customer() -> None:
    conversation = to_conversation(airbyte_conversation_with_parts("1"))
    ids = [p.id for p in conversation.participants]
    assert ids.count("5fd150d50697b6d0bbc4a2c2") == 1
    customer = next(p for p in conversation.participants if p.id == "5fd150d50697b6d0bbc4a2c2")
    assert customer.role == "customer"
    assert [m.id for m in conversation.messages] == ["701718739", "7288120839", "7288121348", "7288121392"]


def test_conversation_fields() -> None:
    conversation = by_name("01_rest_get_conversation_v2.16")
    assert (conversation.state, conversation.tags, conversation.subject) == ("closed", ("Test tag",), None)
    roles = {p.id: p.role for p in conversation.participants}
    # The assignee (991267715) never wrote or acted here: named by assignee_participant_id, not a participant.
    assert roles == {"991267645": "agent", "6762f1261bb69f9f2193bba7": "customer", "274": "agent", "278": "bot"}
    assert conversation.assignee_participant_id == "991267715"


def test_unknown_author_type_is_system_and_team_is_agent() -> None:
    payload = load("07_rest_user_reply_reopens_part_type_open_v2.16.json")
    payload["conversation_parts"]["conversation_parts"][0]["author"]["type"] = "visitor_auto_message"
    payload["admin_assignee_id"] = None
    payload["team_assignee_id"] = 5017691
    conversation = to_conversation(payload)
    roles = {p.id: p.role for p in conversation.participants}
    assert roles["6762f1571bb69f9f2193bbbb"] == "system"
    assert conversation.assignee_participant_id == "5017691"
    payload["conversation_parts"]["conversation_parts"][0]["author"] = {"type": "team", "id": "5017691"}
    assert {p.id: p.role for p in to_conversation(payload).participants}["5017691"] == "agent"


def test_nul_characters_are_stripped_everywhere() -> None:
    payload = load("07_rest_user_reply_reopens_part_type_open_v2.16.json")
    payload["source"]["subject"] = "Sub\u0000ject"
    payload["conversation_parts"]["conversation_parts"][0]["body"] = "<p>Tha\u0000nks</p>"
    payload["conversation_parts"]["conversation_parts"][0]["author"]["name"] = "Jo\u0000e"
    dumped = to_conversation(payload).model_dump_json()
    assert "\\u0000" not in dumped
    conversation = to_conversation(payload)
    assert (conversation.subject, conversation.messages[1].content) == ("Subject", "Thanks")


def test_plain_text_bodies_keep_their_lines_and_have_no_html() -> None:
    payload = load("07_rest_user_reply_reopens_part_type_open_v2.16.json")
    payload["conversation_parts"]["conversation_parts"][0]["body"] = "line one\nline   two"
    message = to_conversation(payload).messages[1]
    assert (message.content, message.content_html) == ("line one\nline two", None)


def test_iso_timestamps_are_accepted() -> None:
    payload = load("07_rest_user_reply_reopens_part_type_open_v2.16.json")
    payload["created_at"] = "2024-12-18T15:59:19+01:00"
    conversation = to_conversation(payload)
    assert conversation.created_at.isoformat() == "2024-12-18T14:59:19+00:00"


def test_goldens_are_not_orphans() -> None:
    expected = {f"{name}.json" for name, _, _ in CASES}
    assert {p.name for p in Path(GOLDEN).glob("*.json")} == expected


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ("Contact me at <john@example.com> please", "Contact me at <john@example.com> please"),
        ("see <https://x.com/a?b=1&c=2> thanks", "see <https://x.com/a?b=1&c=2> thanks"),
        ("a List<String>\nsecond line", "a List<String>\nsecond line"),
    ],
)
def test_plain_text_that_contains_angle_brackets_is_kept(body: str, text: str) -> None:
    payload = load("07_rest_user_reply_reopens_part_type_open_v2.16.json")
    payload["conversation_parts"]["conversation_parts"][0]["body"] = body
    message = to_conversation(payload).messages[1]
    assert (message.content, message.content_html) == (text, None)


@pytest.mark.parametrize("body", ["<p></p>", "<p> </p>", "<br>", "&nbsp;", "   ", ""])
def test_bodies_that_render_to_nothing_are_not_messages(body: str) -> None:
    payload = load("07_rest_user_reply_reopens_part_type_open_v2.16.json")
    payload["conversation_parts"]["conversation_parts"][0]["body"] = body
    payload["source"]["body"] = body
    conversation = to_conversation(payload)
    assert conversation.messages == ()
    assert [e.type for e in conversation.events] == ["opened"]


def test_an_inline_image_alone_is_a_message() -> None:
    payload = load("07_rest_user_reply_reopens_part_type_open_v2.16.json")
    payload["conversation_parts"]["conversation_parts"][0]["body"] = '<p><img src="https://x/y.png"></p>'
    message = to_conversation(payload).messages[1]
    assert (message.content, message.content_html) == ("", '<p><img src="https://x/y.png"></p>')


def test_a_payload_without_subject_or_title_says_nothing_about_the_subject() -> None:
    payload = load("03_rest_get_email_conversation_preview.json")
    del payload["source"]["subject"]
    del payload["title"]
    snapshot = get_provider("intercom").parse_push(
        json.dumps(payload).encode(), workspace="w", default_workspace="default"
    )
    assert "subject" not in snapshot.header.model_fields_set


def completeness_of(payload: dict[str, Any]) -> dict[str, Any]:
    return to_conversation(payload).completeness.model_dump()


def test_a_retrieve_counts_its_opening_message_and_every_part_and_says_when_it_returned_fewer() -> None:
    payload = load("01_rest_get_conversation_v2.16.json")  # 4 parts, all returned
    assert completeness_of(payload) == {"provider_count": 5, "stored_count": 5, "truncated": False}
    payload["conversation_parts"]["total_count"] = 620  # as Intercom counts a conversation it cut to 500 parts
    assert completeness_of(payload) == {"provider_count": 621, "stored_count": 5, "truncated": True}


def test_a_webhook_counts_with_its_statistics_never_with_its_parts_which_are_a_delta() -> None:
    envelope = load("13_webhook_conversation_operator_replied_2026_zulip.json")
    event = get_provider("intercom").webhooks.parse(json.dumps(envelope).encode(), workspace=None)  # type: ignore[union-attr]
    assert event.change is not None
    header = event.change.header  # type: ignore[union-attr]
    assert envelope["data"]["item"]["conversation_parts"]["total_count"] == 1
    assert (header.provider_count, header.counted) == (3, "items")
    assert "truncated" not in header.model_fields_set  # a delta says nothing about what was cut


@pytest.mark.parametrize("count", [-1, "12", 1.5, True, None, [], 2**40])
def test_a_count_that_is_not_one_says_nothing_and_refuses_nothing(count: Any) -> None:
    payload = load("01_rest_get_conversation_v2.16.json")
    payload["conversation_parts"]["total_count"] = count
    payload["statistics"] = {"count_conversation_parts": count}
    assert completeness_of(payload)["provider_count"] is None
    payload["statistics"] = "not an object"
    assert completeness_of(payload)["provider_count"] is None
