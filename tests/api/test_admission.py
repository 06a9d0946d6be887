"""Admission control: past its capacity a process answers 503 with Retry-After at once, and resumes by itself.

Deterministic: requests are held inside the application until the test lets them go, so "full" is a state the
test creates, not a load it hopes to reach.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.types import Receive, Scope, Send

from kbms.api import create_app
from kbms.api.admission import STANDING_WAIT, Admission
from kbms.settings import Settings

pytestmark = pytest.mark.anyio
UNAVAILABLE = {
    "error_code": "unavailable",
    "message": "The service is at capacity; retry after the Retry-After delay",
    "details": None,
}


class Gate:
    """An ASGI app: requests to /held wait until ``release`` is set; /boom raises; anything else answers at once."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        if scope["path"] == "/held":
            self.entered.set()
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Admission, path: str) -> tuple[int, dict[str, str], bytes]:
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


async def held(app: Admission, gate: Gate) -> asyncio.Task[tuple[int, dict[str, str], bytes]]:
    """A request that occupies a slot until the gate opens."""
    gate.entered.clear()
    task = asyncio.create_task(call(app, "/held"))
    await gate.entered.wait()
    return task


async def test_past_capacity_the_answer_is_503_with_retry_after_and_service_resumes() -> None:
    gate = Gate()
    app = Admission(gate, capacity=1, queued=0, wait=30)
    first = await held(app, gate)
    status, headers, body = await call(app, "/other")
    assert (status, headers["retry-after"], json.loads(body)) == (503, "1", UNAVAILABLE)
    assert headers["content-type"] == "application/json"
    gate.release.set()
    assert (await first)[0] == 200
    assert (await call(app, "/other"))[0] == 200  # nothing to reset: the next request is served
    assert (app.in_flight, app.queued) == (0, 0)


async def test_a_queued_request_gets_the_next_free_slot() -> None:
    gate = Gate()
    app = Admission(gate, capacity=1, queued=1, wait=30)
    first = await held(app, gate)
    second = asyncio.create_task(call(app, "/other"))
    await asyncio.sleep(0)
    assert not second.done()
    assert app.queued == 1
    gate.release.set()
    assert [(await first)[0], (await second)[0]] == [200, 200]
    assert (app.in_flight, app.queued) == (0, 0)


async def test_the_queue_is_bounded() -> None:
    gate = Gate()
    app = Admission(gate, capacity=1, queued=1, wait=30)
    first = await held(app, gate)
    second = asyncio.create_task(call(app, "/other"))
    await asyncio.sleep(0)
    assert (await call(app, "/other"))[0] == 503  # the queue is full: refused without waiting
    gate.release.set()
    assert [(await first)[0], (await second)[0]] == [200, 200]


async def test_a_request_that_waits_too_long_is_503() -> None:
    gate = Gate()
    app = Admission(gate, capacity=1, queued=1, wait=0.01)
    first = await held(app, gate)
    status, headers, _ = await call(app, "/other")
    assert (status, headers["retry-after"]) == (503, "1")
    assert app.queued == 0
    gate.release.set()
    await first
    assert app.in_flight == 0


async def test_health_and_ready_are_answered_when_full() -> None:
    gate = Gate()
    app = Admission(gate, capacity=1, queued=0, wait=30)
    first = await held(app, gate)
    assert [(await call(app, "/health"))[0], (await call(app, "/ready"))[0]] == [200, 200]
    gate.release.set()
    await first


async def test_a_failing_request_frees_its_slot() -> None:
    app = Admission(Gate(), capacity=1, queued=0, wait=30)
    with pytest.raises(RuntimeError):
        await call(app, "/boom")
    assert app.in_flight == 0
    assert (await call(app, "/other"))[0] == 200


async def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    gate = Gate()
    app = Admission(gate, capacity=1, queued=2, wait=30)
    first = await held(app, gate)
    waiting = asyncio.create_task(call(app, "/other"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert app.queued == 0
    gate.release.set()
    await first
    assert (app.in_flight, app.queued) == (0, 0)


class HeldStore:
    """A store whose detail reads wait until ``release`` is set (and find nothing)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def get_conversation_json(
        self, conversation_id: str, *, within: frozenset[str] | None = None
    ) -> bytes | None:
        self.entered.set()
        await self.release.wait()
        return None


async def test_the_app_refuses_past_max_in_flight_in_front_of_every_route(tmp_path: Path) -> None:
    store = HeldStore()
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}", max_in_flight=1, max_queued=0)
    app = create_app(settings, store=store)  # type: ignore[arg-type]
    transport = httpx2.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx2.AsyncClient(transport=transport, base_url="http://t") as http:
        # Ids of the shape kbms mints: any other is a 404 before the store is asked.
        first = asyncio.create_task(http.get(f"/internal/conversations/{uuid.uuid4()}"))
        await asyncio.wait_for(store.entered.wait(), 30)
        # Bounded only so that a missing admission control fails the test instead of hanging it.
        refused = asyncio.gather(
            http.get(f"/internal/conversations/{uuid.uuid4()}"),
            http.post("/integrations/intercom/conversations", content=b"{}"),
            http.get("/nowhere"),
        )
        for response in await asyncio.wait_for(refused, 30):
            assert (response.status_code, response.headers["retry-after"]) == (503, "1")
            assert response.json() == UNAVAILABLE
        assert (await http.get("/health")).status_code == 200
        store.release.set()
        assert (await first).status_code == 404
        assert (await http.get(f"/internal/conversations/{uuid.uuid4()}")).status_code == 404  # served again
    # Refused before any route ran, and still counted under the route the path names (unknown paths: unmatched).
    text = app.state.metrics.render().decode()
    for route, method in (
        ("/internal/conversations/{conversation_id}", "GET"),
        ("/integrations/intercom/conversations", "POST"),
        ("unmatched", "GET"),
    ):
        assert f'kbms_http_requests_total{{method="{method}",route="{route}",status="503"}} 1.0' in text


async def test_a_standing_queue_makes_newcomers_wait_only_briefly() -> None:
    gate = Gate()
    app = Admission(gate, capacity=1, queued=10, wait=0.5)
    first = await held(app, gate)
    assert app.allowed_wait(asyncio.get_running_loop().time() + 60) == 0.5  # nobody waits: a burst may queue
    waiting = [asyncio.create_task(call(app, "/other")) for _ in range(2)]
    await asyncio.sleep(0)
    now = asyncio.get_running_loop().time()
    assert app.allowed_wait(now) == 0.5  # queued just now: still a burst
    assert app.allowed_wait(now + 0.6) == STANDING_WAIT  # not emptied for longer than the wait: overload
    gate.release.set()
    assert [(await task)[0] for task in [first, *waiting]] == [200, 200, 200]
    assert app.allowed_wait(asyncio.get_running_loop().time() + 60) == 0.5  # drained: bursts may queue again
