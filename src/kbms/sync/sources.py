"""The sources kbms pulls from: ``KBMS_SOURCES`` (a JSON list) or ``KBMS_SOURCES_FILE`` (a file holding one).

Each entry has exactly the fields ``provider``, ``workspace``, ``token`` and optionally ``email``, ``base_url`` and
``max_requests_per_minute``. A configuration kbms cannot use is refused as a whole, before anything runs, with every
problem named by its entry (counted from 0) and field. No message quotes a value from the configuration: a token
typed into the wrong field must not end up in a log either.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, field_validator

from kbms.model import WORKSPACE_PATTERN
from kbms.providers import REGISTRY, Provider
from kbms.providers.pull import SourceConfig
from kbms.settings import Settings

Workspace = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=WORKSPACE_PATTERN)]
# Printable ASCII without spaces: what API tokens are, and all a header may carry. A token with a newline would
# otherwise fail inside the HTTP client, whose message quotes the header holding it.
PRINTABLE = r"^[!-~]+$"


class SourcesError(ValueError):
    """The sources configuration cannot be used (kbms refuses to start rather than guess)."""


class SourceEntry(BaseModel):
    """One source as an operator configures it."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    provider: str = Field(min_length=1, max_length=64, description="A provider kbms can pull from")
    workspace: Workspace = Field(description="The Intercom app_id or the Zendesk subdomain, as kbms names workspaces")
    token: str = Field(min_length=1, max_length=4096, repr=False)
    email: str | None = Field(default=None, max_length=254, description="Zendesk: basic auth as email/token")
    base_url: str | None = Field(default=None, max_length=2048, description="None: the provider's public API")
    max_requests_per_minute: int | None = Field(default=None, gt=0, description="A ceiling under the provider's")

    @field_validator("token")
    @classmethod
    def _token(cls, value: str) -> str:
        if not _printable(value):
            raise ValueError("a token is printable ASCII, without spaces")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not (_printable(value) and "@" in value):
            raise ValueError("not an email address")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            port = parts.port  # raises on a port that is no number, or out of range
        except ValueError:
            raise ValueError("not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or port == 0 or not _printable(value):
            raise ValueError("not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError("a base URL carries no credentials (the token goes in token)")
        if parts.query or parts.fragment:
            raise ValueError("a base URL has no query or fragment")
        return value.rstrip("/")


SOURCE_LIST = TypeAdapter(list[SourceEntry])


def _printable(text: str) -> bool:
    return bool(text) and all("!" <= char <= "~" for char in text)


def configured_sources(
    inline: str, file: Path | None, *, providers: Mapping[str, Provider] = REGISTRY
) -> list[SourceConfig]:
    """The sources of ``KBMS_SOURCES`` (``inline``) or ``KBMS_SOURCES_FILE`` (``file``), at most one of them set;
    none when neither is. ``providers``: the registry, whose providers with a ``puller`` may be sources."""
    if inline.strip() and file is not None:
        raise SourcesError("KBMS_SOURCES and KBMS_SOURCES_FILE are both set: configure the sources in one of them")
    if file is not None:
        origin = f"KBMS_SOURCES_FILE {str(file)!r}"
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise SourcesError(f"{origin} cannot be read: {reason}") from None
    elif inline.strip():
        origin, text = "KBMS_SOURCES", inline
    else:
        return []
    entries = _parse(text, origin=origin)
    return _checked(entries, origin=origin, providers=providers)


def sources_of(settings: Settings, *, providers: Mapping[str, Provider] = REGISTRY) -> list[SourceConfig]:
    """``configured_sources`` of these settings."""
    return configured_sources(settings.sources, settings.sources_file, providers=providers)


def _parse(text: str, *, origin: str) -> list[SourceEntry]:
    try:
        return SOURCE_LIST.validate_json(text)
    except ValidationError as exc:
        problems = [_where(error["loc"]) + error["msg"] for error in exc.errors(include_url=False, include_input=False)]
        raise SourcesError(f"{origin} is not a valid list of sources: {'; '.join(problems)}") from None


def _where(loc: tuple[int | str, ...]) -> str:
    """``entry 2, field token: `` for pydantic's ``(2, 'token')``."""
    if not loc:
        return ""
    entry = f"entry {loc[0]}"
    fields = ".".join(str(part) for part in loc[1:])
    return f"{entry}, field {fields}: " if fields else f"{entry}: "


def _checked(entries: list[SourceEntry], *, origin: str, providers: Mapping[str, Provider]) -> list[SourceConfig]:
    pullable = sorted(name for name, provider in providers.items() if provider.puller is not None)
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(entries):
        if entry.provider not in pullable:
            known = ", ".join(pullable) or "none yet"
            problems.append(f"entry {index}, field provider: not a provider kbms can pull from ({known})")
        key = (entry.provider, entry.workspace)
        if key in seen:
            problems.append(f"entry {index}: the same provider and workspace as entry {seen[key]}")
        seen.setdefault(key, index)
    if problems:
        raise SourcesError(f"{origin} is not a valid list of sources: {'; '.join(problems)}")
    return [
        SourceConfig(
            provider=entry.provider,
            workspace=entry.workspace,
            token=entry.token,
            email=entry.email,
            base_url=entry.base_url,
            max_requests_per_minute=entry.max_requests_per_minute,
        )
        for entry in entries
    ]
