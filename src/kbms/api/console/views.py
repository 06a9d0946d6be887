"""How console pages are rendered: the Jinja environment (autoescaping on: everything a provider sent is text),
times as ``<time>`` elements, search snippets with their marks, the activity chart's points."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from kbms.model import from_micros
from kbms.search import MARK_END, MARK_START
from kbms.storage.base import Activity

HERE = Path(__file__).parent
CHART_MINUTES = 24 * 60
CHART_HEIGHT = 100


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = time_element
    env.filters["marked"] = marked_snippet
    return env


def _utc(value: datetime | int | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, int):
        return from_micros(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def time_element(value: datetime | int | str | None) -> Markup:
    """A time as ``<time>``: UTC in its text and title; console.js rewrites the text in the viewer's timezone."""
    moment = _utc(value)
    if moment is None:
        return Markup("—")
    machine = moment.strftime("%Y-%m-%dT%H:%M:%S") + "Z"
    return Markup('<time datetime="{0}" title="{1} UTC">{2} UTC</time>').format(
        machine, moment.strftime("%Y-%m-%d %H:%M:%S"), moment.strftime("%Y-%m-%d %H:%M")
    )


def marked_snippet(snippet: str | None) -> Markup:
    """A search snippet (``kbms.search``: HTML-escaped text with ``<mark>`` around matches), rebuilt so that only
    those marks survive: every piece between them is unescaped and escaped again, so nothing else can be markup."""
    if not snippet:
        return Markup("")
    out = Markup("")
    for index, piece in enumerate(snippet.split(MARK_START)):
        inside, _, after = piece.partition(MARK_END) if index else ("", "", piece)
        if index:
            out += Markup("<mark>{0}</mark>").format(html.unescape(inside))
        out += html.unescape(after)  # Markup + str escapes the str
    return out


def render(env: Environment, template: str, context: Mapping[str, Any], *, status: int = 200) -> HTMLResponse:
    return HTMLResponse(env.get_template(template).render(**context), status_code=status)


def chart(minutes: Sequence[Activity], *, since: int) -> dict[str, Any]:
    """The activity chart's two polylines (received, rejected) over 24 hours, one point per minute, and totals."""
    received = [0] * CHART_MINUTES
    rejected = [0] * CHART_MINUTES
    for bucket in minutes:
        slot = (bucket.minute - since) // 60_000_000
        if 0 <= slot < CHART_MINUTES:
            received[slot] += bucket.received
            rejected[slot] += bucket.rejected
    peak = max(max(received), 1)

    def points(series: list[int]) -> str:
        return " ".join(f"{x},{CHART_HEIGHT - round(n * CHART_HEIGHT / peak, 1)}" for x, n in enumerate(series))

    return {
        "received_points": points(received),
        "rejected_points": points(rejected),
        "received": sum(received),
        "rejected": sum(rejected),
        "peak": max(received),
        "width": CHART_MINUTES,
        "height": CHART_HEIGHT,
    }
