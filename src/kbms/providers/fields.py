"""Field types shared by provider schemas: tolerant of how providers spell things, strict about what they mean.

- ids arrive as strings or integers; they are kept as trimmed strings and may not be empty;
- numbers (an attachment's size) are integers, or digits in a string: booleans, fractions and other text are
  refused (pydantic's lax ``int`` reads ``true`` as 1 and ``"1_000"`` as 1000);
- timestamps arrive as unix seconds or ISO-8601 strings; booleans and fractional numbers are refused (a fraction is
  usually a millisecond mistake), and so is anything outside 1970-2100 (milliseconds sent as seconds land there).

An integer may be written ``5.0``: JSON has one number type, and JSON Schema (which documents these fields in
OpenAPI) counts any number without a fractional part as an integer, so ``5.0`` is the integer ``5`` here too.

Every error raised here names a stable issue, reported at the field's own dotted path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainValidator, TypeAdapter, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2101, 1, 1, tzinfo=UTC)  # exclusive: "within 1970-2100"


DIGITS = re.compile("[0-9]{1,19}")  # an integer in a string: ASCII digits alone, at most 19 of them
MAX_ID = 255  # ids are keys in unique indexes; PostgreSQL refuses index entries over ~2.7 KB


def integral(value: Any) -> int | None:
    """The integer a JSON number stands for (``5`` or ``5.0``); None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _id(value: Any) -> str:
    if not isinstance(value, str):
        number = integral(value)
        if number is None:
            raise PydanticCustomError("string_type", "Input should be a string or an integer")
        value = number
    if isinstance(value, int) and value.bit_length() > 847:  # more than 255 digits
        raise PydanticCustomError("string_too_long", "Id should have at most 255 characters")
    text = str(value).replace("\x00", "").strip()
    if not text:
        raise PydanticCustomError("string_too_short", "Id should not be empty")
    if len(text) > MAX_ID:
        raise PydanticCustomError("string_too_long", "Id should have at most 255 characters")
    return text


def _integer(value: Any) -> int:
    # Booleans, fractions and text other than digits are refused where payloads arrive. An older kbms read these
    # fields with pydantic's lax int (``true``, ``" 7"``, ``"1_000"``), and kept what it read as accepted: re-reading
    # the ledger (``kbms reprocess``) reads them as it did, rather than delete conversations nothing new refutes.
    if isinstance(value, str) and DIGITS.fullmatch(value):
        return int(value)
    number = integral(value)
    if number is None:
        if _READING_THE_LEDGER.get():
            try:
                return _LAX_INT.validate_python(value)
            except ValidationError:
                pass
        raise PydanticCustomError("int_type", "Input should be an integer")
    return number


_LAX_INT = TypeAdapter(int)
_READING_THE_LEDGER: ContextVar[bool] = ContextVar("kbms_reading_the_ledger", default=False)


@contextmanager
def reading_the_ledger() -> Iterator[None]:
    """Within it, fields read payloads as the kbms that kept them did (see ``_integer``): for ``kbms reprocess``."""
    token = _READING_THE_LEDGER.set(True)
    try:
        yield
    finally:
        _READING_THE_LEDGER.reset(token)


def _optional_id(value: Any) -> str | None:
    """Optional ids: null, "" and whitespace all mean "none" (Intercom sends each of them)."""
    if value is None or (isinstance(value, str) and not value.replace("\x00", "").strip()):
        return None
    return _id(value)


def _optional_text(value: Any) -> Any:
    """Empty strings are null: providers send "" for "not set". NUL is removed (PostgreSQL refuses it)."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "")
        if not value.strip():
            return None
    return value


def _count(value: Any) -> int | None:
    """A count the provider reports about itself: informative, never a reason to refuse a payload, so anything
    but a non-negative integer reads as "not said"."""
    number = integral(value)
    return number if number is not None and 0 <= number < 2**31 else None


def parse_timestamp(value: Any) -> datetime:
    """A UTC datetime from unix seconds (int or digit string) or an ISO-8601 string."""
    if not isinstance(value, str):
        seconds = integral(value)
        if seconds is None:
            raise PydanticCustomError(
                "timestamp_type", "Input should be unix seconds (an integer) or an ISO-8601 string"
            )
        value = seconds
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            return _in_range(_parse_iso(text))
        if len(text) > 12:  # beyond year 33658: out of range, and int() refuses very long digit strings anyway
            raise _out_of_range()
        value = int(text)
    try:
        result = datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise _out_of_range() from None
    return _in_range(result)


def _parse_iso(text: str) -> datetime:
    try:
        return utc_from_iso(text, "Input should be an ISO-8601 timestamp or unix seconds")
    except OverflowError:
        raise _out_of_range() from None


def utc_from_iso(text: str, message: str) -> datetime:
    """An ISO-8601 (RFC 3339) text as a UTC datetime; without an offset it is UTC. An unreadable one raises
    ``timestamp_parsing`` with ``message``; ``OverflowError`` when its offset moves it past what a datetime holds
    ("9999-12-31T23:59:59-23:59"), which each caller treats in its own way."""
    try:
        # RFC 3339 allows a lower-case "t" and "z", which Python 3.11 does not read.
        parsed = datetime.fromisoformat(text.upper())
    except ValueError:
        raise PydanticCustomError("timestamp_parsing", message) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _in_range(value: datetime) -> datetime:
    if not EARLIEST <= value < LATEST:
        raise _out_of_range()
    return value


def _out_of_range() -> PydanticCustomError:
    return PydanticCustomError("timestamp_range", "Timestamp should be between 1970-01-01 and 2100-12-31")


# What the documented schemas promise is accepted (schemathesis holds the API to it). A string id needs a character
# that is neither NUL nor whitespace as str.strip() sees it (spelled out: "\\s" means less in other regex engines);
# its length counts as sent. Timestamps: 1971-2099 as text, because a UTC offset can move 1970-01-01 or 2100-12-31
# across the 1970-2100 bounds, and a pattern cannot see the offset.
_NOT_BLANK = "[^\\x00\\t-\\r\\x1c- \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
_STRING_ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": _NOT_BLANK}
_ID_SCHEMA = {"anyOf": [_STRING_ID_SCHEMA, {"type": "integer"}]}
_OPTIONAL_ID_SCHEMA = {"anyOf": [{"type": "string", "maxLength": MAX_ID}, {"type": "integer"}, {"type": "null"}]}
LATEST_SECONDS = int(LATEST.timestamp()) - 1
_TIMESTAMP_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 0, "maximum": LATEST_SECONDS, "description": "unix seconds"},
        {"type": "string", "format": "date-time", "pattern": "^(197[1-9]|19[89][0-9]|20[0-9][0-9])-"},
    ],
    "description": "Unix seconds or ISO-8601, between 1970-01-01 and 2100-12-31 UTC",
}

Id = Annotated[str, PlainValidator(_id), WithJsonSchema(_ID_SCHEMA)]
OptionalId = Annotated[
    str | None,
    PlainValidator(_optional_id),
    WithJsonSchema(_OPTIONAL_ID_SCHEMA),
]
_INTEGER_SCHEMA = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^[0-9]{1,19}$"}]}
Integer = Annotated[int, PlainValidator(_integer), WithJsonSchema(_INTEGER_SCHEMA)]
Timestamp = Annotated[datetime, PlainValidator(parse_timestamp), WithJsonSchema(_TIMESTAMP_SCHEMA)]
OptionalText = Annotated[str | None, BeforeValidator(_optional_text)]
OptionalCount = Annotated[int | None, PlainValidator(_count), WithJsonSchema({"type": ["integer", "null"]})]
