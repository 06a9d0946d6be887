"""The fake Zendesk keeps the rules the client is careful not to break, so that a client that broke them would fail."""

from __future__ import annotations

import base64

import pytest
from starlette.testclient import TestClient

from tests.providers.zendesk.fake import FakeZendesk, build_app
from tests.providers.zendesk.fake_api import EXPORT
from tests.support.clock import VirtualClock


@pytest.fixture
def fake() -> FakeZendesk:
    zendesk = FakeZendesk(VirtualClock())
    zendesk.add_user(20, "Carla", "end-user")
    zendesk.put_ticket(1, requester_id=20)
    for n in range(150):
        zendesk.add_comment(1, 20, f"comment {n}")
    zendesk.clock.advance(120)
    return zendesk


def http(fake: FakeZendesk) -> TestClient:
    basic = base64.b64encode(f"{fake.email}/token:{fake.api_token}".encode()).decode()
    return TestClient(build_app(fake), base_url="https://acme.zendesk.com", headers={"Authorization": f"Basic {basic}"})


def test_start_time_within_the_last_minute_is_refused(fake: FakeZendesk) -> None:
    answer = http(fake).get(f"{EXPORT}.json", params={"start_time": int(fake.clock.now()) - 30})
    assert answer.status_code == 422
    assert answer.json()["description"].startswith("Too recent start_time")


def test_the_export_holds_back_the_most_recent_minute(fake: FakeZendesk) -> None:
    fake.put_ticket(2)
    page = http(fake).get(f"{EXPORT}.json", params={"start_time": 0}).json()
    assert [ticket["id"] for ticket in page["tickets"]] == [1]
    assert page["end_of_stream"] is True
    assert page["before_cursor"] is None
    fake.clock.advance(61)
    later = http(fake).get(f"{EXPORT}.json", params={"cursor": page["after_cursor"]}).json()
    assert [ticket["id"] for ticket in later["tickets"]] == [2]


def test_comment_pages_are_at_most_100(fake: FakeZendesk) -> None:
    client = http(fake)
    assert client.get("/api/v2/tickets/1/comments.json", params={"page[size]": 101}).status_code == 400
    cursor = client.get("/api/v2/tickets/1/comments.json", params={"page[size]": 100}).json()
    assert (len(cursor["comments"]), cursor["meta"]["has_more"]) == (100, True)
    assert cursor["links"]["next"].startswith("https://acme.zendesk.com/api/v2/tickets/1/comments.json?")
    offset = client.get("/api/v2/tickets/1/comments.json").json()  # no page[size]: offset pagination
    assert (len(offset["comments"]), offset["count"], "meta" in offset) == (100, 150, False)


def test_the_export_allows_ten_requests_a_minute(fake: FakeZendesk) -> None:
    client = http(fake)
    statuses = [client.get(f"{EXPORT}.json", params={"start_time": 0}).status_code for _ in range(11)]
    assert statuses == [200] * 10 + [429]
    assert fake.export_limited == 1
    fake.clock.advance(60)
    assert client.get(f"{EXPORT}.json", params={"start_time": 0}).status_code == 200


def test_unauthenticated_requests(fake: FakeZendesk) -> None:
    anonymous = TestClient(build_app(fake), base_url="https://acme.zendesk.com")
    assert anonymous.get("/api/v2/users/me.json").json()["user"]["id"] is None  # "allowed for anonymous users"
    assert anonymous.get(f"{EXPORT}.json", params={"start_time": 0}).status_code == 401
    wrong = TestClient(build_app(fake), base_url="https://acme.zendesk.com", headers={"Authorization": "Bearer nope"})
    answer = wrong.get("/api/v2/users/me.json")
    assert (answer.status_code, answer.json()) == (401, {"error": "Couldn't authenticate you"})
