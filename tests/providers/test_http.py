"""The HTTP every provider client shares (``kbms.providers.http``, ``pacing``): retries, 429s, refusals, pacing, and
no credential in any message. Through ``httpx2.MockTransport`` on a virtual clock: exact and instant."""

from __future__ import annotations

import email.utils
import logging
import random
from collections.abc import Callable

import httpx2
import pytest
import stamina

from kbms.providers.http import Api, Budget, Pacer, RetryPolicy, ServerClock, retry_after
from kbms.providers.pull import ClientStats, ProviderRefused, ProviderUnreachable
from tests.support.clock import VirtualClock

pytestmark = pytest.mark.anyio

TOKEN = "s3cr3t-token-value"
Handler = Callable[[httpx2.Request], httpx2.Response]


def api(clock: VirtualClock, handler: Handler, **options: object) -> Api:
    return Api(
        base_url="https://api.example.test",
        max_requests_per_minute=1000,
        headers={"Authorization": f"Bearer {TOKEN}"},
        secrets=(TOKEN,),
        transport=httpx2.MockTransport(handler),
        timing=clock.timing,
        rng=random.Random(15),
        **options,  # type: ignore[arg-type]
    )


def answers(*responses: httpx2.Response | type[Exception]) -> Handler:
    """A handler answering ``responses`` in turn, the last one from then on (an exception class: raised)."""
    queue = list(responses)

    def handler(request: httpx2.Request) -> httpx2.Response:
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, type):
            raise answer("connection trouble", request=request)  # type: ignore[call-arg]
        return answer

    return handler


async def test_a_5xx_is_retried_with_backoff_through_the_clock() -> None:
    clock = VirtualClock()
    handler = answers(httpx2.Response(503), httpx2.Response(502), httpx2.Response(200, json={"ok": True}))
    client = api(clock, handler)
    reply = await client.request("GET", "/thing")
    assert reply.status == 200
    assert reply.data == {"ok": True}
    assert client.stats.requests == 3
    assert client.stats.retries == 2
    # Exponential (0.5, then 1.0) plus jitter below 1 s: waited on the test's clock, nothing else.
    assert len(clock.slept) == 2
    assert 0.5 <= clock.slept[0] < 1.5
    assert 1.0 <= clock.slept[1] < 2.0
    assert client.stats.waited_seconds == pytest.approx(sum(clock.slept))


@pytest.mark.parametrize(
    "failure",
    [httpx2.Response(500), httpx2.ConnectError, httpx2.ReadTimeout, httpx2.RemoteProtocolError],
    ids=["500", "refused", "timeout", "reset"],
)
async def test_repeated_transient_failures_become_unreachable_after_the_attempts(
    failure: httpx2.Response | type[Exception],
) -> None:
    clock = VirtualClock()
    handler = answers(failure)
    client = api(clock, handler, retry=RetryPolicy(attempts=4))
    with pytest.raises(ProviderUnreachable, match=r"api\.example\.test.*after 4 attempts") as raised:
        await client.request("GET", "/thing")
    assert client.stats.requests == 4
    assert client.stats.retries == 3
    assert TOKEN not in str(raised.value)


@pytest.mark.parametrize(
    "garbage",
    [
        httpx2.Response(200, text="<html>captive portal</html>", headers={"content-type": "text/html"}),
        httpx2.Response(200, content=b"\xff\xfe not utf-8"),
        httpx2.Response(200, json={"type": "something.else"}),
    ],
    ids=["html", "bytes", "wrong-json"],
)
async def test_a_2xx_that_is_not_the_api_is_unreachable(garbage: httpx2.Response) -> None:
    clock = VirtualClock()
    handler = answers(garbage)
    client = api(clock, handler, retry=RetryPolicy(attempts=3))
    with pytest.raises(ProviderUnreachable, match="answered something that is not its API"):
        await client.request("GET", "/thing", expect=lambda data: isinstance(data, dict) and data.get("type") == "ok")
    assert client.stats.requests == 3


@pytest.mark.parametrize(("status", "code"), [(401, "unauthorized"), (403, "api_plan_restricted")])
async def test_refused_credentials_are_not_retried(status: int, code: str) -> None:
    clock = VirtualClock()
    body = {"type": "error.list", "errors": [{"code": code, "message": f"bad token {TOKEN}"}]}
    handler = answers(httpx2.Response(status, json=body))
    client = api(clock, handler)
    with pytest.raises(ProviderRefused) as raised:
        await client.request("GET", "/me")
    assert f"HTTP {status} ({code})" in str(raised.value)
    assert "api.example.test" in str(raised.value)
    assert TOKEN not in str(raised.value)
    assert client.stats.requests == 1
    assert clock.slept == []


async def test_another_4xx_fails_at_once_and_an_allowed_one_is_an_answer() -> None:
    clock = VirtualClock()
    handler = answers(httpx2.Response(404, json={"type": "error.list", "errors": [{"code": "not_found"}]}))
    client = api(clock, handler)
    reply = await client.request("GET", "/conversations/1", allow=(404,))
    assert reply.status == 404
    assert reply.data["errors"][0]["code"] == "not_found"
    with pytest.raises(ProviderUnreachable, match=r"HTTP 404 \(not_found\) to GET /conversations/1"):
        await client.request("GET", "/conversations/1")
    assert client.stats.requests == 2


async def test_a_429_waits_its_retry_after_and_spends_no_attempt() -> None:
    clock = VirtualClock()
    limited = httpx2.Response(429, headers={"retry-after": "7"})
    handler = answers(limited, limited, httpx2.Response(503), httpx2.Response(200, json={}))
    client = api(clock, handler, retry=RetryPolicy(attempts=2))
    await client.request("GET", "/thing")  # two 429s, then one failure and one success: within 2 attempts
    assert client.stats.rate_limited == 2
    assert client.stats.retries == 1
    assert client.stats.requests == 4
    assert clock.slept[:2] == [7.0, 7.0]


async def test_a_429_without_a_word_backs_off_and_gives_up_after_too_many() -> None:
    clock = VirtualClock()
    handler = answers(httpx2.Response(429))
    client = api(clock, handler, retry=RetryPolicy(max_rate_limited=4, rate_limit_backoff=5.0))
    with pytest.raises(ProviderUnreachable, match="kept answering 429"):
        await client.request("GET", "/thing")
    assert client.stats.requests == 4
    assert client.stats.retries == 0
    assert clock.slept == [5.0, 10.0, 20.0]  # the fourth 429 is not waited out: it gives up


async def test_a_429_waits_for_the_budget_reset() -> None:
    clock = VirtualClock()
    reset = clock.now() + 4
    limited = httpx2.Response(429, headers={"x-limit": "10", "x-left": "0", "x-reset": str(reset)})

    def budget(response: httpx2.Response, now: float) -> Budget | None:
        if "x-reset" not in response.headers:
            return None
        headers = response.headers
        return Budget(int(headers["x-limit"]), int(headers["x-left"]), float(headers["x-reset"]))

    handler = answers(limited, httpx2.Response(200, json={}))
    client = api(clock, handler, budget=budget)
    await client.request("GET", "/thing")
    assert clock.now() >= reset
    assert client.stats.rate_limit_waits >= 1


def test_retry_after_reads_seconds_and_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after(httpx2.Response(429, headers={"retry-after": "12"}), now) == 12.0
    date = "Tue, 14 Nov 2023 22:13:40 GMT"  # now + 20 s
    assert retry_after(httpx2.Response(429, headers={"retry-after": date}), now) == pytest.approx(20.0)
    assert retry_after(httpx2.Response(429, headers={"retry-after": "soon"}), now) is None
    assert retry_after(httpx2.Response(429), now) is None


async def test_the_ceiling_is_never_exceeded_in_any_minute() -> None:
    clock = VirtualClock()
    stats = ClientStats()
    pacer = Pacer(max_per_minute=30, timing=clock.timing, stats=stats)
    sent = []
    for _ in range(100):
        await pacer.acquire()
        sent.append(clock.now())
    assert all(later - earlier >= 60.0 for earlier, later in zip(sent, sent[30:], strict=False))
    assert sent[1] - sent[0] == pytest.approx(2.0)  # evenly: no burst, then a pause
    assert clock.now() - sent[0] == pytest.approx(99 * 2.0)  # and no slower than it must


async def test_the_budget_is_spread_over_its_window_and_not_exceeded() -> None:
    clock = VirtualClock()
    pacer = Pacer(max_per_minute=10_000, timing=clock.timing, stats=ClientStats(), margin=0.0)
    start = clock.now()
    await pacer.acquire()
    pacer.learn(Budget(limit=10, remaining=9, reset_at=start + 10))
    sent = []
    for _ in range(9):
        await pacer.acquire()
        sent.append(clock.now() - start)
    assert sent == pytest.approx([1.0 * k for k in range(1, 10)])  # evenly, the last before the reset
    await pacer.acquire()  # the window is spent: the next one waits for the reset
    assert clock.now() - start == pytest.approx(10.0)


async def test_stamina_instrumentation_is_quiet_and_no_secret_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = VirtualClock()
    handler = answers(httpx2.Response(503), httpx2.Response(429), httpx2.ConnectError, httpx2.Response(200, json={}))
    client = api(clock, handler)
    assert stamina.instrumentation.get_on_retry_hooks() == ()
    await client.request("GET", "/thing", params={"q": "x"})
    assert any("attempt 2" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in repr(record.args)


async def test_a_base_url_with_credentials_is_named_by_its_host_only() -> None:
    clock = VirtualClock()
    handler = answers(httpx2.Response(500))
    client = Api(
        base_url=f"https://user:{TOKEN}@api.example.test/v2",
        max_requests_per_minute=100,
        secrets=(TOKEN,),
        transport=httpx2.MockTransport(handler),
        timing=clock.timing,
        retry=RetryPolicy(attempts=2),
    )
    with pytest.raises(ProviderUnreachable) as raised:
        await client.request("GET", "/thing")
    assert "api.example.test" in str(raised.value)
    assert TOKEN not in str(raised.value)


def test_the_server_clock_approaches_the_providers_offset_from_below() -> None:
    # A Date is the provider's time floored to the second: each answer alone is up to a second low.
    server = ServerClock()
    skew = 30.7
    offsets = []
    for k in range(20):
        now = 1_700_000_000.0 + 0.37 * k
        date = email.utils.formatdate(now + skew, usegmt=True)
        offsets.append(server.offset(httpx2.Response(200, headers={"date": date}), now))
    assert all(offset <= skew for offset in offsets)
    assert offsets[-1] > skew - 0.1
    assert ServerClock().offset(httpx2.Response(200), 1_700_000_000.0) == 0.0  # no Date: no offset
