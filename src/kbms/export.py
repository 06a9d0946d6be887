"""Exports for notebooks and spreadsheets: NDJSON, CSV and Parquet, from one snapshot, in constant memory.

- NDJSON: one conversation detail per line, exactly as ``GET /internal/conversations/{id}`` serves it;
- CSV: one row per conversation (``CSV_COLUMNS``), with counts, the first response time and the resolution time
  where the data allows;
- Parquet (``pip install 'kbms[parquet]'``): a directory with ``conversations.parquet`` (the CSV's columns, typed)
  and ``messages.parquet`` (one row per message), schemas ``CONVERSATIONS_SCHEMA`` and ``MESSAGES_SCHEMA``.

Each batch of conversations read from the store is written before the next is read.
"""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

import anyio

from kbms.storage.base import ExportBatch

Format = Literal["ndjson", "csv", "parquet"]
FORMATS: tuple[Format, ...] = ("ndjson", "csv", "parquet")
CSV_COLUMNS = (
    "id",
    "provider",
    "workspace",
    "external_id",
    "subject",
    "state",
    "channel",
    "assignee_participant_id",
    "tags",
    "created_at",
    "updated_at",
    "revision",
    "participant_count",
    "message_count",
    "public_message_count",
    "internal_message_count",
    "customer_message_count",
    "agent_message_count",
    "first_message_at",
    "last_message_at",
    "first_response_seconds",
    "resolution_seconds",
)
MESSAGE_COLUMNS = (
    "conversation_id",
    "message_id",
    "author_participant_id",
    "author_role",
    "sent_at",
    "updated_at",
    "visibility",
    "content",
    "content_html",
    "attachment_count",
    "redacted",
    "provider_type",
)
RESOLVED = frozenset(("closed", "solved"))


class ParquetUnavailable(Exception):
    """pyarrow is not installed (it is the optional extra ``kbms[parquet]``)."""


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def conversation_row(detail: dict[str, Any]) -> dict[str, Any]:
    """One conversation as a flat row: the CSV's columns, with datetimes and a tag list."""
    roles = {p["id"]: p["role"] for p in detail["participants"]}
    messages = detail["messages"]
    created_at = _time(detail["created_at"])
    sent = [(_time(m["sent_at"]), roles.get(m["author_participant_id"]), m["visibility"]) for m in messages]
    first_customer = next((at for at, role, _v in sent if role == "customer"), None)
    first_response = None
    if first_customer is not None:
        reply = next(
            (at for at, role, v in sent if role == "agent" and v == "public" and at and at >= first_customer), None
        )
        first_response = (reply - first_customer).total_seconds() if reply is not None else None
    resolution = None
    if detail.get("state") in RESOLVED and created_at is not None:
        closed = [_time(e["occurred_at"]) for e in detail.get("events", ()) if e["type"] == "closed"]
        closed_at = max((at for at in closed if at is not None), default=None)
        resolution = (closed_at - created_at).total_seconds() if closed_at is not None else None
    times = [at for at, _r, _v in sent if at is not None]
    return {
        "id": detail["id"],
        "provider": detail["provider"],
        "workspace": detail["workspace"],
        "external_id": detail["external_id"],
        "subject": detail.get("subject"),
        "state": detail.get("state"),
        "channel": detail.get("channel"),
        "assignee_participant_id": detail.get("assignee_participant_id"),
        "tags": list(detail.get("tags", ())),
        "created_at": created_at,
        "updated_at": _time(detail["updated_at"]),
        "revision": detail["revision"],
        "participant_count": len(detail["participants"]),
        "message_count": len(messages),
        "public_message_count": sum(1 for m in messages if m["visibility"] == "public"),
        "internal_message_count": sum(1 for m in messages if m["visibility"] == "internal"),
        "customer_message_count": sum(1 for _at, role, _v in sent if role == "customer"),
        "agent_message_count": sum(1 for _at, role, _v in sent if role == "agent"),
        "first_message_at": min(times, default=None),
        "last_message_at": max(times, default=None),
        "first_response_seconds": first_response,
        "resolution_seconds": resolution,
    }


def message_rows(detail: dict[str, Any]) -> list[dict[str, Any]]:
    roles = {p["id"]: p["role"] for p in detail["participants"]}
    return [
        {
            "conversation_id": detail["id"],
            "message_id": m["id"],
            "author_participant_id": m["author_participant_id"],
            "author_role": roles.get(m["author_participant_id"]),
            "sent_at": _time(m["sent_at"]),
            "updated_at": _time(m.get("updated_at")),
            "visibility": m["visibility"],
            "content": m["content"],
            "content_html": m.get("content_html"),
            "attachment_count": len(m.get("attachments", ())),
            "redacted": bool(m.get("redacted")),
            "provider_type": m.get("provider_type"),
        }
        for m in detail["messages"]
    ]


async def write_export(
    batches: AsyncIterator[ExportBatch], fmt: Format, out: Path, *, progress: Callable[[int, int], None]
) -> int:
    """Write every batch to ``out`` in ``fmt``; ``progress(done, total)`` after each batch. Returns the count."""
    if fmt == "parquet":
        return await _write_parquet(batches, out, progress)
    done = 0
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = _csv_writer(handle) if fmt == "csv" else None
        async for batch in batches:
            for raw in batch.details:
                if writer is None:
                    handle.write(raw.decode())
                    handle.write("\n")
                else:
                    writer.writerow(_csv_values(conversation_row(json.loads(raw))))
            done += len(batch.details)
            progress(done, batch.total)
    return done


def _csv_writer(handle: IO[str]) -> Any:
    writer = csv.writer(handle)
    writer.writerow(CSV_COLUMNS)
    return writer


def _csv_values(row: dict[str, Any]) -> list[Any]:
    def cell(name: str) -> Any:
        value = row[name]
        if isinstance(value, datetime):
            return value.isoformat().replace("+00:00", "Z")
        if isinstance(value, list):
            return ";".join(value)
        return "" if value is None else value

    return [cell(name) for name in CSV_COLUMNS]


def parquet_schemas() -> tuple[Any, Any]:
    """(conversations, messages) as pyarrow schemas."""
    try:
        import pyarrow as pa
    except ImportError:
        raise ParquetUnavailable("Parquet needs pyarrow: pip install 'kbms[parquet]'") from None
    utc = pa.timestamp("us", tz="UTC")
    conversations = pa.schema(
        [
            ("id", pa.string()),
            ("provider", pa.string()),
            ("workspace", pa.string()),
            ("external_id", pa.string()),
            ("subject", pa.string()),
            ("state", pa.string()),
            ("channel", pa.string()),
            ("assignee_participant_id", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("created_at", utc),
            ("updated_at", utc),
            ("revision", pa.int64()),
            ("participant_count", pa.int32()),
            ("message_count", pa.int32()),
            ("public_message_count", pa.int32()),
            ("internal_message_count", pa.int32()),
            ("customer_message_count", pa.int32()),
            ("agent_message_count", pa.int32()),
            ("first_message_at", utc),
            ("last_message_at", utc),
            ("first_response_seconds", pa.float64()),
            ("resolution_seconds", pa.float64()),
        ]
    )
    messages = pa.schema(
        [
            ("conversation_id", pa.string()),
            ("message_id", pa.string()),
            ("author_participant_id", pa.string()),
            ("author_role", pa.string()),
            ("sent_at", utc),
            ("updated_at", utc),
            ("visibility", pa.string()),
            ("content", pa.string()),
            ("content_html", pa.string()),
            ("attachment_count", pa.int32()),
            ("redacted", pa.bool_()),
            ("provider_type", pa.string()),
        ]
    )
    return conversations, messages


async def _write_parquet(batches: AsyncIterator[ExportBatch], out: Path, progress: Callable[[int, int], None]) -> int:
    conversations_schema, messages_schema = parquet_schemas()
    import pyarrow as pa
    import pyarrow.parquet as pq

    await anyio.Path(out).mkdir(parents=True, exist_ok=True)
    done = 0
    with (
        pq.ParquetWriter(out / "conversations.parquet", conversations_schema) as conversations,
        pq.ParquetWriter(out / "messages.parquet", messages_schema) as messages,
    ):
        async for batch in batches:
            details = [json.loads(raw) for raw in batch.details]
            if details:
                rows = [conversation_row(d) for d in details]
                conversations.write_table(pa.Table.from_pylist(rows, schema=conversations_schema))
                message_list = [row for d in details for row in message_rows(d)]
                if message_list:
                    messages.write_table(pa.Table.from_pylist(message_list, schema=messages_schema))
            done += len(details)
            progress(done, batch.total)
    return done
