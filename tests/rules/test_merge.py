"""The merge lattice: deliveries in any order, with duplicates, converge; nothing rolls back; nothing is lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kbms.merge import ConversationState, merge, new_state
from kbms.model import (
    ConversationHeader,
    ConversationSnapshot,
    Event,
    Message,
    ParticipantObservation,
)
from kbms.render import preview, render

T0 = datetime(2024, 1, 1, tzinfo=UTC)
PART_IDS = [str(1000 + i) for i in range(6)]
PEOPLE = ["u1", "a1", "b1"]


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


@st.composite
def messages(draw: Any) -> Message:
    part = draw(st.sampled_from(PART_IDS))
    # A part's creation time and author are facts about the part; its body and updated_at change (redaction).
    return Message(
        id=part,
        author_participant_id=PEOPLE[int(part) % 3],
        sent_at=at(int(part) - 1000),
        updated_at=at(int(part) - 1000 + draw(st.integers(0, 3))),
        content=draw(st.sampled_from(["hello", "bonjour", "[redacted]"])),
        redacted=draw(st.booleans()),
        provider_type="comment",
    )


@st.composite
def snapshots(draw: Any) -> ConversationSnapshot:
    version = draw(st.integers(10, 14))
    header: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "subject": st.sampled_from([None, "Billing", "Refund"]),
                "state": st.sampled_from([None, "open", "closed", "snoozed"]),
                "tags": st.lists(st.sampled_from(["vip", "bug"]), unique=True).map(tuple),
                "assignee_participant_id": st.sampled_from([None, "a1", "b1"]),
                "channel": st.sampled_from(["email", "messenger"]),
            },
        )
    )
    observations = draw(
        st.lists(
            st.builds(
                ParticipantObservation,
                id=st.sampled_from(PEOPLE),
                role=st.sampled_from([None, "customer", "agent"]),
                name=st.sampled_from([None, "Ana", "Ben"]),
                email=st.sampled_from([None, "x@example.com"]),
                seen_at=st.integers(0, 5).map(at),
            ),
            max_size=4,
        )
    )
    events = draw(
        st.lists(
            st.builds(
                Event,
                id=st.sampled_from(PART_IDS),
                type=st.just("assigned"),
                actor_participant_id=st.just("a1"),
                occurred_at=st.sampled_from(PART_IDS).map(lambda p: at(int(p) - 1000)),
            ),
            max_size=3,
            unique_by=lambda e: e.id,
        )
    )
    return ConversationSnapshot(
        provider="intercom",
        workspace="w",
        external_id="c1",
        created_at=at(0),
        version=at(version),
        header=ConversationHeader(**header),
        participants=tuple(observations),
        messages=tuple(draw(st.lists(messages(), max_size=4, unique_by=lambda m: m.id))),
        events=tuple(events),
    )


def apply_all(deliveries: list[ConversationSnapshot]) -> ConversationState:
    state = new_state("id", deliveries[0])
    for snapshot in deliveries[1:]:
        state = merge(state, snapshot).state
    return state


def comparable(state: ConversationState) -> dict[str, Any]:
    # ``revision`` counts stored changes, so it depends on how many deliveries changed something; all else must not.
    detail = render(state).model_dump(mode="json")
    del detail["revision"]
    return detail


@settings(max_examples=300, deadline=None)
@given(st.lists(snapshots(), min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_any_order_with_duplicates_converges(deliveries: list[ConversationSnapshot], rng: Any) -> None:
    shuffled = deliveries + [rng.choice(deliveries) for _ in range(rng.randint(0, 3))]
    rng.shuffle(shuffled)
    assert comparable(apply_all(shuffled)) == comparable(apply_all(deliveries))


@settings(max_examples=200, deadline=None)
@given(st.lists(snapshots(), min_size=1, max_size=5), snapshots())
def test_reapplying_a_payload_changes_nothing(
    deliveries: list[ConversationSnapshot], again: ConversationSnapshot
) -> None:
    state = merge(apply_all(deliveries), again).state
    result = merge(state, again)
    assert not result.changed
    assert result.state == state


@settings(max_examples=200, deadline=None)
@given(st.lists(snapshots(), min_size=1, max_size=6))
def test_messages_are_never_lost_and_fields_follow_the_newest_payload(deliveries: list[ConversationSnapshot]) -> None:
    detail = render(apply_all(deliveries))
    assert {m.id for m in detail.messages} == {m.id for d in deliveries for m in d.messages}
    observed_state = [d for d in deliveries if "state" in d.header.model_fields_set]
    if observed_state:
        newest = max(d.version for d in observed_state)
        assert detail.state in {d.header.state for d in observed_state if d.version == newest}
    assert detail.updated_at == max(d.version for d in deliveries)


def snapshot(version: int, header: ConversationHeader | None = None, *messages: Message) -> ConversationSnapshot:
    return ConversationSnapshot(
        provider="intercom",
        workspace="w",
        external_id="c1",
        created_at=at(0),
        version=at(version),
        header=header or ConversationHeader(),
        messages=messages,
    )


def text(part: str, version: int) -> Message:
    return Message(id=part, author_participant_id="u1", sent_at=at(version), content=part)


def test_older_snapshot_adds_parts_but_never_rolls_fields_back() -> None:
    state = new_state("id", snapshot(20, ConversationHeader(state="closed"), text("2000", 20)))
    result = merge(state, snapshot(10, ConversationHeader(state="open"), text("1000", 10)))
    assert result.changed
    detail = render(result.state)
    assert detail.state == "closed"
    assert [m.id for m in detail.messages] == ["1000", "2000"]
    assert detail.revision == 2


def test_redaction_overwrites_and_an_older_copy_does_not_undo_it() -> None:
    original = Message(id="1", author_participant_id="u1", sent_at=at(0), updated_at=at(0), content="my card 4242")
    redacted = original.model_copy(update={"content": "[redacted]", "redacted": True, "updated_at": at(60)})
    state = merge(new_state("id", snapshot(1, None, original)), snapshot(61, None, redacted)).state
    assert render(state).messages[0].content == "[redacted]"
    assert not merge(state, snapshot(1, None, original)).changed


def test_a_changed_body_in_a_newer_payload_wins_even_without_a_newer_part_time() -> None:
    secret = Message(id="1", author_participant_id="u1", sent_at=at(0), content="my password is hunter2")
    deleted = secret.model_copy(update={"content": "This message was deleted"})
    in_order = merge(new_state("id", snapshot(100, None, secret)), snapshot(200, None, deleted))
    assert in_order.changed
    assert render(in_order.state).messages[0].content == "This message was deleted"
    # The older copy, arriving late, changes nothing; in the other order the result is the same.
    assert not merge(in_order.state, snapshot(100, None, secret)).changed
    reversed_order = merge(new_state("id", snapshot(200, None, deleted)), snapshot(100, None, secret)).state
    assert render(reversed_order).messages == render(in_order.state).messages


def test_a_newer_payload_with_an_unchanged_message_is_not_a_change_but_is_remembered() -> None:
    hello = Message(id="1", author_participant_id="u1", sent_at=at(0), content="hello")
    state = new_state("id", snapshot(100, None, hello))
    newer = merge(state, snapshot(200, None, hello))
    assert not newer.messages
    assert newer.rewritten_messages == {"1"}
    assert newer.state.message_versions["1"] > state.message_versions["1"]
    # An edit from a payload between the two must not win over what the newest payload said.
    edited = hello.model_copy(update={"content": "hello (edited)"})
    assert not merge(newer.state, snapshot(150, None, edited)).messages


def test_a_payload_that_omits_a_field_says_nothing_about_it() -> None:
    base = snapshot(1, ConversationHeader(subject="Billing", tags=("vip",)))
    minimal = snapshot(2, ConversationHeader(state="closed"))
    detail = render(merge(new_state("id", base), minimal).state)
    assert (detail.subject, detail.tags, detail.state) == ("Billing", ("vip",), "closed")


def test_preview_is_one_line_and_cut_with_an_ellipsis() -> None:
    assert preview("a\n b") == "a b"
    long = preview("word " * 100)
    assert len(long) == 120
    assert long.endswith("…")
