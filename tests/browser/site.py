"""The console under test: kbms's app served over real HTTP in a thread, with API keys, a source (the fake Intercom,
served too), real fixture conversations, a refused payload and a hostile conversation stored through the API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from kbms.api import create_app
from kbms.auth import digest, new_key
from kbms.model import ConversationSnapshot
from kbms.providers import REGISTRY
from kbms.providers.intercom import IntercomProvider
from kbms.settings import Settings
from tests.conftest import migrated_sqlite_url
from tests.providers.intercom.fake import FakeIntercom
from tests.support.helpers import dumps, intercom_conversations, intercom_payload, part, zendesk_pushes
from tests.support.served import served

ADMIN, READER, READER_B = (new_key() for _ in range(3))
KEYS = [
    {"name": "admin", "sha256": digest(ADMIN), "scopes": ["admin"]},
    {"name": "reader", "sha256": digest(READER), "scopes": ["read"]},
    {"name": "reader-b", "sha256": digest(READER_B), "scopes": ["read"], "workspaces": ["ws-b"]},
]
T0 = 1_700_000_000
MANY = 56  # conversations in workspace ws-many: more than a page
# What a hostile conversation's text tries: each payload, if it ever ran, would set window.__pwned; the remote
# image and the link's host are TEST-NET addresses (RFC 5737), never served.
HOSTILE_HOST = "198.51.100.7"
HOSTILE_HTML = (
    "<p>Payload zebrafish <script>window.__pwned = 'script'</script></p>"
    '<p><img src="x" onerror="window.__pwned = \'onerror\'"> broken image</p>'
    "<p><a href=\"javascript:window.__pwned = 'link'\">click me</a></p>"
    f'<p><img src="http://{HOSTILE_HOST}/track.png"> remote image</p>'
    f'<p><a href="http://{HOSTILE_HOST}/x" onmouseover="window.__pwned = \'hover\'">hover</a></p>'
    "<svg><script>window.__pwned = 'svg'</script></svg>"
    "<iframe src=\"javascript:parent.__pwned = 'iframe'\"></iframe>"
    f"<style>body {{ background: url(http://{HOSTILE_HOST}/bg.png) }}</style>"
)
HOSTILE_TEXT = "Hostile <script>window.__pwned = 'text'</script><img src=x onerror=\"window.__pwned = 'name'\"> subject"


class SwitchableIntercom(IntercomProvider):
    """Today's Intercom mapper, or, once ``fixed``, a mapper fix: parts without an id get one (their position),
    where today's refuses them. The served app reads through this object, reprocessing included, so a test fixes
    the cause of a refusal by flipping ``fixed``."""

    fixed = False

    def parse_push(self, body: bytes, *, workspace: str | None, default_workspace: str) -> ConversationSnapshot:
        if self.fixed:
            document = json.loads(body)
            for index, item in enumerate(document.get("conversation_parts", {}).get("conversation_parts", [])):
                item.setdefault("id", f"{document['id']}-part-{index}")
            body = json.dumps(document).encode()
        return super().parse_push(body, workspace=workspace, default_workspace=default_workspace)


@dataclass
class Console:
    url: str
    intercom: SwitchableIntercom
    fake: FakeIntercom
    ids: dict[str, str] = field(default_factory=dict)
    """Conversation ids by name: "quokka" (searchable, ws-a), "ws-b" (the limited key's), "hostile"."""

    def push(self, payload: dict[str, Any], *, workspace: str, provider: str = "intercom") -> httpx2.Response:
        return httpx2.post(
            f"{self.url}/integrations/{provider}/conversations",
            params={"workspace": workspace},
            content=dumps(payload),
            headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
            timeout=10,
        )

    def stored(self, payload: dict[str, Any], *, workspace: str, provider: str = "intercom") -> str:
        answer = self.push(payload, workspace=workspace, provider=provider)
        assert answer.status_code in (200, 201), answer.text
        return str(answer.json()["id"])

    def refuse(self, external_id: str, *, workspace: str) -> None:
        """A payload today's mapper refuses (a part without an id), kept in the ledger as rejected."""
        payload = intercom_payload(external_id, title=f"Refused {external_id}", parts=[part("p")])
        del payload["conversation_parts"]["conversation_parts"][0]["id"]
        answer = self.push(payload, workspace=workspace)
        assert answer.status_code == 422, answer.text


def seed(console: Console) -> None:
    for _name, workspace, payload in intercom_conversations():
        assert console.push(payload, workspace=workspace).status_code in (200, 201)
    for _case, payload in zendesk_pushes():
        assert console.push(payload, workspace="acme", provider="zendesk").status_code in (200, 201)
    quokka = intercom_payload(
        "quokka-1",
        title="Quokka invoice question",
        updated_at=T0 + 60,
        state="open",
        tags={"type": "tag.list", "tags": [{"type": "tag", "id": "t2", "name": "billing"}]},
        parts=[
            part("q1", "<p>Why does my quokka invoice list the plan twice?</p>", at=T0 + 30),
            part("q2", "<p>Checking with billing: a known double charge.</p>", at=T0 + 60, part_type="note"),
        ],
    )
    quokka["source"]["body"] = "<p>Hello! A question about my <b>March</b> invoice.</p>"
    quokka["source"]["author"] = {"type": "user", "id": "u2", "name": "Ana Lima", "email": "ana@example.com"}
    console.ids["quokka"] = console.stored(quokka, workspace="ws-a")
    console.ids["ws-b"] = console.stored(
        intercom_payload("wombat-1", title="Wombat delivery late", parts=[part("w1", "<p>The wombat is late</p>")]),
        workspace="ws-b",
    )
    hostile = intercom_payload(
        "hostile-1",
        title=HOSTILE_TEXT,
        parts=[part("h1", HOSTILE_HTML), part("h2", HOSTILE_HTML, part_type="note", at=T0 + 200)],
    )
    hostile["source"]["author"]["name"] = HOSTILE_TEXT
    hostile["tags"] = {"type": "tag.list", "tags": [{"type": "tag", "id": "t1", "name": HOSTILE_TEXT}]}
    console.ids["hostile"] = console.stored(hostile, workspace="ws-a")
    console.refuse("refused-ws-a", workspace="ws-a")
    for n in range(MANY):
        console.stored(intercom_payload(f"many-{n}", updated_at=T0 + n), workspace="ws-many")


@contextmanager
def serve_console(directory: Path) -> Iterator[Console]:
    """The console at a local URL, seeded; with a source pulling from a served fake Intercom."""
    fake = FakeIntercom(limit=100_000)
    now = int(time.time())
    for i in range(3):
        fake.add(f"{9000 + i}", updated_at=now - 600 + i, parts=2)
    intercom = SwitchableIntercom()
    with ExitStack() as stack:
        fake_url = stack.enter_context(served(fake.app))
        source = {"provider": "intercom", "workspace": fake.app_id, "token": fake.token, "base_url": fake_url}
        settings = Settings(
            database_url=migrated_sqlite_url(directory),
            api_keys=json.dumps(KEYS),
            sources=json.dumps([{**source, "max_requests_per_minute": 1_000_000}]),
            sync_interval=3600,  # the pass at startup, then only those an admin starts
        )
        app = create_app(settings, providers={**REGISTRY, "intercom": intercom})
        url = stack.enter_context(served(app, lifespan="on"))
        console = Console(url=url, intercom=intercom, fake=fake)
        seed(console)
        yield console
