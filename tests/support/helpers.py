"""Test data: the recorded Intercom fixtures and the original design document's examples."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kbms.deliveries import Applied, Delivery, KnownDelivery
from kbms.model import Change, Redactor
from tests.support import canary

ROOT = Path(__file__).resolve().parents[1]
INTERCOM = ROOT / "providers" / "intercom" / "fixtures"
ORIGINAL_DESIGN = ROOT.parent / "docs" / "original-design.md"
JSON_HEADERS = {"content-type": "application/json"}


def load(name: str) -> Any:
    return json.loads((INTERCOM / name).read_text())


def intercom_conversations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(fixture name, workspace, conversation object) for every fixture that carries a whole conversation."""
    for path in sorted(INTERCOM.glob("*.json")):
        doc = json.loads(path.read_text())
        if doc.get("type") == "notification_event":
            item = doc["data"]["item"]
            if item.get("type") == "conversation" and ("source" in item or "conversation_message" in item):
                yield path.stem, doc["app_id"], item
        elif doc.get("type") == "conversation.list":
            for conversation in doc["conversations"]:
                yield path.stem, "default", conversation
        elif doc.get("type") == "conversation":
            yield path.stem, "default", doc
    yield "20_airbyte_conversation_1_with_parts", "default", airbyte_conversation_with_parts("1")


def airbyte_records() -> list[dict[str, Any]]:
    lines = (INTERCOM / "20_rest_records_airbyte_test_workspace.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def airbyte_conversation_with_parts(conversation_id: str) -> dict[str, Any]:
    """Airbyte emits conversations and their parts as separate records; put them back together."""
    records = airbyte_records()
    conversation = next(
        r["data"] for r in records if r["stream"] == "conversations" and r["data"]["id"] == conversation_id
    )
    parts = [
        r["data"]
        for r in records
        if r["stream"] == "conversation_parts" and str(r["data"]["conversation_id"]) == conversation_id
    ]
    return {**conversation, "conversation_parts": {"type": "conversation_part.list", "conversation_parts": parts}}


def original_examples() -> dict[str, Any]:
    """The JSON examples of the original design document, by the bold title above each."""
    text = ORIGINAL_DESIGN.read_text()
    examples: dict[str, Any] = {}
    for match in re.finditer(r"\*\*(?P<title>[^*]+)\*\*\n```json\n(?P<body>.*?)```", text, re.S):
        examples[match["title"]] = json.loads(match["body"])
    for match in re.finditer(
        r"(?P<title>Validation failures return[^\n]*|Malformed JSON returns:)\n+```json\n(?P<body>.*?)```", text, re.S
    ):
        examples[match["title"]] = json.loads(match["body"])
    return examples


def original_request_text() -> str:
    """The example request exactly as written in the document (bytes matter for the ledger hash)."""
    text = ORIGINAL_DESIGN.read_text()
    start = text.index("**Example Request**\n```json\n") + len("**Example Request**\n```json\n")
    return text[start : text.index("```", start)]


def intercom_payload(
    conversation_id: str = "c1",
    *,
    created_at: int = 1_700_000_000,
    updated_at: int | None = None,
    parts: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A minimal, valid Intercom conversation (2.x shape) with the given parts."""
    return {
        "type": "conversation",
        "id": conversation_id,
        "created_at": created_at,
        "updated_at": updated_at if updated_at is not None else created_at,
        "source": {
            "type": "conversation",
            "id": f"{conversation_id}-m0",
            "body": "<p>Hello</p>",
            "author": {"type": "user", "id": "u1", "name": "Ana", "email": canary.EMAIL},
        },
        "conversation_parts": {"type": "conversation_part.list", "conversation_parts": parts or []},
        **fields,
    }


def part(
    part_id: str, body: str | None = f"<p>Hi, {canary.TEXT}</p>", *, at: int = 1_700_000_100, **fields: Any
) -> dict[str, Any]:
    return {
        "type": "conversation_part",
        "id": part_id,
        "part_type": "comment",
        "body": body,
        "created_at": at,
        "updated_at": at,
        "author": {"type": "admin", "id": "a1", "name": "Ben"},
        **fields,
    }


def dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


ZENDESK = ROOT / "providers" / "zendesk" / "fixtures"


def zendesk(name: str) -> Any:
    return json.loads((ZENDESK / name).read_text())


def zendesk_pushes() -> Iterator[tuple[str, dict[str, Any]]]:
    """(case, push body) built from the REST fixtures: a ticket, its comments and side-loaded users, as a client
    pushes them (``GET /api/v2/tickets/{id}``, ``.../comments``, ``?include=users``)."""
    yield (
        "01_02_docs_ticket_with_comment",
        {
            "ticket": zendesk("01_rest_ticket_show_docs.json")["ticket"],
            "comments": zendesk("02_rest_ticket_comments_docs.json")["comments"],
        },
    )
    # A recorded ticket creation: its comment is the audit's Comment event, which carries no time of its own
    # (the audit's) and no author (the audit's), as GET .../comments would give them.
    created = zendesk("04_rest_ticket_create_with_sideloads_recorded_zenpy.json")
    audit = created["audit"]
    comments = [
        {**event, "created_at": audit["created_at"], "author_id": event.get("author_id", audit["author_id"])}
        for event in audit["events"]
        if event["type"] == "Comment"
    ]
    yield (
        "04_recorded_ticket_with_admin_user",
        {"ticket": created["ticket"], "users": created["users"], "comments": comments},
    )
    yield (
        "05_08_email_solved_with_empty_html_bodies",
        {
            "ticket": zendesk("05_rest_ticket_show_email_solved_go_zendesk.json")["ticket"],
            "comments": zendesk("08_rest_ticket_comments_empty_bodies_go_zendesk.json")["comments"],
        },
    )
    for ticket in zendesk("06_rest_tickets_list_email_and_web_go_zendesk.json")["tickets"]:
        yield f"06_list_item_{ticket['id']}_{ticket['via']['channel']}", {"ticket": ticket}
    sideloaded = zendesk("07_rest_ticket_show_include_users_groups_go_zendesk.json")
    yield "07_new_ticket_with_users", {"ticket": sideloaded["ticket"], "users": sideloaded["users"]}
    audit = zendesk("09_rest_ticket_audits_private_comment_go_zendesk.json")["audits"][0]
    yield (
        "09_private_note",
        {
            "ticket": {"id": audit["ticket_id"], "created_at": audit["created_at"]},
            "comments": [
                {**event, "created_at": audit["created_at"], "author_id": audit["author_id"]}
                for event in audit["events"]
                if event["type"] == "Comment"
            ],
        },
    )


ZENDESK_TICKET_EVENTS = (
    "21_webhook_ticket_created_docs_copy.json",
    "22_webhook_ticket_attachment_linked_to_comment_docs_copy.json",
    "23_webhook_messaging_ticket_message_added_docs.json",
    "24_webhook_ticket_comment_added_thirdparty_dust.json",
    "25_webhook_ticket_status_changed_thirdparty_dust.json",
    "26_webhook_ticket_agent_assignment_changed_thirdparty_dust.json",
)


class ExplodingStore:
    """A store whose writes and pings fail the way a bug or an unreachable database would (``failure``); a
    delivery is never known, so every push reaches the write. Enough of a store for the app's error paths."""

    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    async def find_delivery(self, provider: str, delivery_key: str) -> KnownDelivery | None:
        return None

    async def ingest(self, delivery: Delivery, change: Change | None, *, redact: Redactor | None = None) -> Applied:
        raise self.failure

    async def ping(self) -> None:
        raise self.failure

    def pool_usage(self) -> list[Any]:
        return []
