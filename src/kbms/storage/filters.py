"""The list filters (``kbms.storage.base.Filters``) as SQL: the conditions of those that are set, each with a
``b_<filter>`` parameter, their values, and their shape (which filters are set), which keys a prebuilt statement.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, false, select, true

from kbms.storage.base import Filters
from kbms.storage.schema import conversation_tags, conversations

FILTERS = ("provider", "workspace", "state", "tag", "updated_after", "updated_before", "within")


def filter_shape(filters: Filters) -> tuple[bool | None, ...]:
    # ``truncated`` is written into the statement rather than bound (see below): its value is part of the shape.
    return (*(getattr(filters, name) is not None for name in FILTERS), filters.truncated)


def filter_conditions(filters: Filters) -> list[Any]:
    """The WHERE conditions of the filters that are set, each with a ``b_<filter>`` parameter."""
    c = conversations.c
    conditions: list[Any] = []
    for name in ("provider", "workspace", "state"):
        if getattr(filters, name) is not None:
            conditions.append(c[name] == bindparam(f"b_{name}"))
    if filters.tag is not None:
        tagged = select(conversation_tags.c.conversation_pk).where(
            conversation_tags.c.conversation_pk == c.pk, conversation_tags.c.tag == bindparam("b_tag")
        )
        conditions.append(tagged.exists())
    if filters.updated_after is not None:
        conditions.append(c.updated_at > bindparam("b_updated_after"))
    if filters.updated_before is not None:
        conditions.append(c.updated_at < bindparam("b_updated_before"))
    if filters.within is not None:
        conditions.append(c.workspace.in_(bindparam("b_within", expanding=True)))
    if filters.truncated is not None:
        # A literal, as the partial index ix_conversations_live_truncated is written: SQLite uses the index only
        # for a query that repeats its condition.
        conditions.append(c.truncated == (true() if filters.truncated else false()))
    return conditions


def filter_params(filters: Filters) -> dict[str, Any]:
    params = {f"b_{name}": getattr(filters, name) for name in FILTERS if getattr(filters, name) is not None}
    if filters.within is not None:
        params["b_within"] = sorted(filters.within)
    return params
