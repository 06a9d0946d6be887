"""The HTTP every provider client shares (issue 15): an ``Api`` per source, paced to the provider's advertised rate
limit (``Pacer``, in ``pacing.py``), retrying what is transient, naming what failed without its credentials.

How one ``Api.request`` ends:

- a 2xx whose body is JSON of the expected kind, or a status the caller takes (``allow``, e.g. a 404): a ``Reply``;
- 429: wait for the provider's reset (its ``Budget``), its ``Retry-After``, or else a backoff, and ask again. This
  spends no retry attempt, but ``RetryPolicy.max_rate_limited`` 429s in a row give up: ``ProviderUnreachable``;
- 401, 403: ``ProviderRefused`` at once (unless the caller takes it, to say what the refusal means);
- 5xx, a timeout, a refused or reset connection, a 2xx that is not the API's JSON: retried with exponential backoff
  and jitter, then ``ProviderUnreachable``. stamina counts the attempts; the waits go through ``Timing``;
- any other status: ``ProviderUnreachable`` at once (kbms asked something the API does not answer).

Messages name the host, the request's method and path, and the status or the kind of failure: never a header, a
query string or a credential (the source's secrets are also scrubbed from anything quoted from an answer).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
import stamina

from kbms.providers.pacing import Budget, BudgetReader, Pacer, ServerClock, clock_offset, no_budget, retry_after
from kbms.providers.pull import ClientStats, ProviderRefused, ProviderUnreachable, Timing

log = logging.getLogger(__name__)
WALL_CLOCK = Timing()

__all__ = [
    "Api",
    "Budget",
    "BudgetReader",
    "Pacer",
    "Reply",
    "RetryPolicy",
    "ServerClock",
    "clock_offset",
    "is_json",
    "no_budget",
    "retry_after",
]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5  # tries of one request (the first included) before ProviderUnreachable
    wait_initial: float = 0.5  # the backoff after the first failure; doubles after each, up to wait_max
    wait_max: float = 30.0
    wait_jitter: float = 1.0  # plus uniform(0, wait_jitter)
    max_rate_limited: int = 10  # 429s in a row (each waited out) before giving up
    rate_limit_backoff: float = 5.0  # the wait after a 429 that says nothing of when; doubles, up to 60 s


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer taken: its status, its body as received, and that body's JSON (None when it is not JSON)."""

    status: int
    content: bytes
    data: Any


def is_json(data: object) -> bool:
    """Any JSON will do (the default ``expect``)."""
    return True


class _Transient(Exception):
    """A failure another attempt may not meet; its message names the host and what happened, no credential."""


_NOT_JSON = object()


def _retry_transient(exc: Exception) -> bool | float:
    # 0.0: "retry, after no wait" for stamina: the backoff is waited through Timing by Api.request itself, so that
    # tests on a virtual clock are exact, and stamina's own sleep (asyncio's) never runs.
    return 0.0 if isinstance(exc, _Transient) else False


class Api:
    """One source's connection to a provider's API: keep-alive connections, timeouts, its base URL, headers and
    authentication; ``transport`` replaces the network in tests (``httpx2.ASGITransport``, ``MockTransport``)."""

    def __init__(
        self,
        *,
        base_url: str,
        max_requests_per_minute: int,
        headers: Mapping[str, str] | None = None,
        auth: httpx2.Auth | None = None,
        secrets: Sequence[str] = (),
        budget: BudgetReader = no_budget,
        transport: httpx2.AsyncBaseTransport | None = None,
        timing: Timing = WALL_CLOCK,
        retry: RetryPolicy = RetryPolicy(),
        timeout: float = 30.0,
        stats: ClientStats | None = None,
        rng: random.Random | None = None,
    ) -> None:
        quiet_stamina()
        self.stats = stats if stats is not None else ClientStats()
        self.timing = timing
        self.retry = retry
        self.pacer = Pacer(max_per_minute=max_requests_per_minute, timing=timing, stats=self.stats)
        self.host = httpx2.URL(base_url).host  # without userinfo a base URL might carry
        self._budget = budget
        self._secrets = tuple(secret for secret in secrets if secret)
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 (jitter, not a secret)
        self._client = httpx2.AsyncClient(
            base_url=base_url,
            headers=headers,
            auth=auth,
            transport=transport,
            timeout=httpx2.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: object = None,
        expect: Callable[[Any], bool] = is_json,
        allow: Collection[int] = (),
        pacer: Pacer | None = None,
    ) -> Reply:
        """``method path`` (relative to the base URL), paced, retried; ``expect`` tells a 2xx's JSON from
        something that is not the API's answer; ``allow``: non-2xx statuses the caller takes as answers;
        ``pacer``: the endpoint's own limit, paced on top of the source's (every attempt counts in both)."""
        wait = 0.0
        cause = ""
        tried = 0
        try:
            async for attempt in stamina.retry_context(
                on=_retry_transient,
                attempts=self.retry.attempts,
                timeout=None,  # bounded by the attempts: stamina's timeout would run on the wall clock
                wait_initial=self.retry.wait_initial,
                wait_max=self.retry.wait_max,
                wait_jitter=0.0,  # added below, from the injectable random source
            ):
                with attempt:
                    tried = attempt.num
                    if tried > 1:
                        self.stats.retries += 1
                        log.warning("%s; attempt %d in %.1f s", cause, tried, wait)
                        self.stats.waited_seconds += wait
                        await self.timing.sleep(wait)
                    try:
                        return await self._answer(method, path, params, json_body, expect, allow, pacer)
                    except _Transient as exc:
                        cause = str(exc)
                        if stamina.is_active():
                            jitter = self._rng.uniform(0.0, self.retry.wait_jitter)
                            wait = min(self.retry.wait_max, attempt.next_wait + jitter)
                        raise
        except _Transient as exc:
            raise ProviderUnreachable(f"{exc}, after {tried} attempts") from None
        raise AssertionError("stamina ended without an answer or an exception")  # pragma: no cover

    async def _answer(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        json_body: object,
        expect: Callable[[Any], bool],
        allow: Collection[int],
        pacer: Pacer | None,
    ) -> Reply:
        """One attempt: the request, asked again after each 429 (waited out, not counted as an attempt)."""
        backoff = self.retry.rate_limit_backoff
        for _ in range(self.retry.max_rate_limited):
            await self.pacer.acquire(*(() if pacer is None else (pacer,)))
            self.stats.requests += 1
            try:
                response = await self._client.request(method, path, params=params, json=json_body)
            except httpx2.RequestError as exc:  # timeouts, refused or reset connections, protocol errors
                raise _Transient(f"{self.host} did not answer {method} {path} ({self._describe(exc)})") from None
            now = self.timing.now()
            budget = self._budget(response, now)
            self.pacer.learn(budget)
            if response.status_code != httpx2.codes.TOO_MANY_REQUESTS:
                return self._judge(method, path, response, expect, allow)
            self.stats.rate_limited += 1
            wait = retry_after(response, now)
            if wait is None and budget is not None and budget.reset_at is not None and budget.reset_at > now:
                wait = budget.reset_at - now
            if wait is None:
                wait, backoff = backoff, min(2 * backoff, 60.0)
            log.warning("%s: rate limited (429) on %s %s; asking again in %.1f s", self.host, method, path, wait)
            self.pacer.hold(now + wait)
        raise ProviderUnreachable(
            f"{self.host} kept answering 429 (rate limited) to {method} {path}, "
            f"{self.retry.max_rate_limited} times in a row"
        )

    def _judge(
        self, method: str, path: str, response: httpx2.Response, expect: Callable[[Any], bool], allow: Collection[int]
    ) -> Reply:
        status = response.status_code
        content = response.content
        data = _parse(content)
        what = f"HTTP {status}{self._code(data)}"
        if status in (httpx2.codes.UNAUTHORIZED, httpx2.codes.FORBIDDEN) and status not in allow:
            raise ProviderRefused(f"{self.host} refused the credentials: {what} to {method} {path}")
        if 200 <= status < 300:
            if data is _NOT_JSON or not expect(data):
                kind = response.headers.get("content-type", "no content type").split(";")[0][:60]
                raise _Transient(
                    f"{self.host} answered something that is not its API to {method} {path} (HTTP {status}, {kind})"
                )
            return Reply(status, content, data)
        if status in allow:
            return Reply(status, content, None if data is _NOT_JSON else data)
        if status >= 500:
            raise _Transient(f"{self.host} failed {method} {path}: {what}")
        raise ProviderUnreachable(f"{self.host} answered {what} to {method} {path}")

    def _code(self, data: object) -> str:
        """The error code an answer's body gives, if any (Intercom: ``errors[0].code``; Zendesk: ``error``)."""
        code: object = None
        if isinstance(data, dict):
            errors = data.get("errors")
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                code = errors[0].get("code")
            elif isinstance(data.get("error"), str):
                code = data["error"]
        return f" ({self._scrub(code)[:80]})" if isinstance(code, str) and code else ""

    def _describe(self, exc: Exception) -> str:
        # An httpx2 message may quote the URL (never a header): keep the kind, and the message scrubbed.
        text = self._scrub(str(exc))[:120]
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[secret]")
        return text


def _parse(content: bytes) -> object:
    try:
        return json.loads(content)
    except ValueError:  # not UTF-8 (UnicodeDecodeError is one) or not JSON
        return _NOT_JSON


def quiet_stamina() -> None:
    """stamina's default instrumentation logs each retried call's arguments (``repr``: a client, a token) and
    registers its counter in Prometheus' default registry: kbms counts retries in ``ClientStats`` and logs them
    itself, naming no argument. Process-wide, so done when a client is made, not at import."""
    stamina.instrumentation.set_on_retry_hooks(())
