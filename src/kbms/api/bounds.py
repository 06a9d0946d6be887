"""The time bounds of the consumer filters (``updated_after``, ``updated_before``): unix seconds or ISO-8601.

Unlike a payload's timestamps, which must fall in 1970-2100, a bound is only a point in time, and any instant is a
meaningful one: the documented schema (any unix second a datetime can hold, any RFC 3339 date-time) is accepted
whole, and other ISO-8601 forms (a date, no offset: UTC) are read too.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import PlainValidator, TypeAdapter, WithJsonSchema
from pydantic_core import PydanticCustomError

from kbms.providers.fields import utc_from_iso

MAX_UNIX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a datetime holds
# An integer, possibly written "5.0": JSON Schema's integers include numbers without a fraction, and so does the
# documented schema of these parameters.
UNIX_SECONDS = re.compile(r"([0-9]+)(?:\.0+)?", re.ASCII)


def filter_time(value: Any) -> datetime:
    """A bound, in UTC; raises what pydantic reports as a 422 naming the parameter."""
    if not isinstance(value, str):
        raise PydanticCustomError("timestamp_type", "Input should be unix seconds or an ISO-8601 string")
    text = value.strip()
    seconds = UNIX_SECONDS.fullmatch(text)
    if seconds is not None:
        digits = seconds.group(1)
        if len(digits) > 12 or int(digits) > MAX_UNIX_SECONDS:
            raise PydanticCustomError("timestamp_range", f"Unix seconds should be at most {MAX_UNIX_SECONDS}")
        return datetime.fromtimestamp(int(digits), tz=UTC)
    try:
        return utc_from_iso(text, "Input should be unix seconds or an ISO-8601 string (2024-05-01T12:00:00Z)")
    except OverflowError:
        # An offset can move the first or last day a datetime holds past it: such a bound is beyond every update.
        return datetime.min.replace(tzinfo=UTC) if text.startswith("0001") else datetime.max.replace(tzinfo=UTC)


TIME_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 0, "maximum": MAX_UNIX_SECONDS, "description": "unix seconds"},
        {"type": "string", "format": "date-time"},
    ]
}
TIME: TypeAdapter[datetime] = TypeAdapter(Annotated[datetime, PlainValidator(filter_time), WithJsonSchema(TIME_SCHEMA)])
