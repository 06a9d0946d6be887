"""Typed settings, read from ``KBMS_*`` environment variables when (and only when) ``Settings()`` is built."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kbms.model import WORKSPACE_PATTERN

DEFAULT_DATABASE_URL = "sqlite:///data/kbms.db"
MIB = 1024 * 1024

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class Settings(BaseSettings):
    """Everything an operator can configure. CLI flags override the matching variable."""

    model_config = SettingsConfigDict(env_prefix="KBMS_", extra="ignore", frozen=True)

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="sqlite:///relative/path.db, sqlite:////absolute/path.db or postgresql://user@host/db",
    )
    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds to")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the HTTP server listens on")
    log_level: LogLevel = Field(default="info", description="Minimum level of the JSON log lines")
    max_body_bytes: int = Field(
        default=5 * MIB, ge=1024, description="Largest request body accepted (and largest line of a batch)"
    )
    max_batch_bytes: int = Field(default=32 * MIB, ge=1024, description="Largest batch (NDJSON) body accepted")
    db_pool_size: int = Field(default=10, ge=1, le=1000, description="PostgreSQL connections per process")
    db_pool_timeout: float = Field(
        default=1.5, gt=0, le=30, description="Seconds a request waits for a free connection before a 503"
    )
    db_timeout: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Seconds a request waits on the database (SQLite: for the write lock; PostgreSQL: for its "
        "transaction, a batch's once per 100 lines) before a 503",
    )
    workers: int = Field(default=1, ge=1, le=64, description="HTTP worker processes of `kbms serve`")
    allow_unsigned_webhooks: bool = Field(
        default=False, description="Accept webhooks without a valid signature: local testing only, warned at start"
    )
    api_keys: str = Field(
        default="",
        description="API keys as a JSON list of {name, sha256, scopes, workspaces?, revoked?} (see `kbms keys create`)",
    )
    api_keys_file: Path | None = Field(default=None, description="A JSON file holding more API keys, same format")
    # Limits on what one payload may hold (refused with 422, nothing kept). Intercom returns at most 500 parts per
    # conversation and a Zendesk ticket holds at most 5,000 comments: the defaults leave room above both.
    max_parts: int = Field(default=10_000, ge=1, description="Messages plus events (and participants) in one payload")
    max_list_items: int = Field(default=1_000, ge=1, description="Tags of a conversation, attachments of a message")
    max_message_chars: int = Field(default=1_048_576, ge=1, description="Characters of one message's text or HTML")
    max_field_chars: int = Field(
        default=8_192, ge=1, description="Characters of any other text: subject, names, emails, tags, URLs"
    )
    # Slow clients: how long a request may take to arrive (enforced by kbms serve's HTTP protocol, kbms.server).
    header_timeout: float = Field(
        default=5.0, gt=0, le=300, description="Seconds from a request's first byte to the end of its headers"
    )
    # With header_timeout: a client trickling its head and then its body is cut off after at most about 9 s.
    body_timeout: float = Field(
        default=4.0, gt=0, le=300, description="Seconds for a body to arrive, plus 1 s per body_min_rate bytes received"
    )
    body_min_rate: int = Field(
        default=10_000, ge=1, description="Bytes per second a body must keep up, on average, past body_timeout"
    )
    keepalive_timeout: int = Field(
        default=5, ge=1, le=300, description="Seconds an idle keep-alive connection is kept open"
    )
    max_header_bytes: int = Field(
        default=65_536, ge=1024, description="Bytes of a request line and headers (431 past it)"
    )
    # Overload: per process, at most max_in_flight requests run; max_queued more wait at most queue_timeout seconds
    # for a slot; anything else is answered 503 with Retry-After at once (kbms.api.admission). A 503 comes after
    # that wait plus however late the event loop runs under load (up to 0.6 s measured on a shared 2-core machine):
    # 0.25 s keeps it within 1 s.
    max_in_flight: int = Field(default=64, ge=1, le=10_000, description="Requests handled at once per process")
    max_queued: int = Field(default=256, ge=0, le=100_000, description="Requests waiting for a slot per process")
    queue_timeout: float = Field(
        default=0.25, ge=0, le=30, description="Seconds a request waits for a slot before a 503 (bursts only)"
    )
    # Pulling from providers (issue 15; kbms.sync). The sources hold tokens: kept out of reprs, and a plain str
    # rather than a SecretStr, because `kbms serve --workers N` hands its settings to the workers as environment
    # text (str(value)), where a SecretStr would arrive as its mask.
    sources: str = Field(
        default="",
        repr=False,
        description="Sources to pull from, as a JSON list of {provider, workspace, token, email?, base_url?, "
        "max_requests_per_minute?}",
    )
    sources_file: Path | None = Field(default=None, description="A JSON file holding the sources instead, same format")
    sync: Literal["on", "off"] = Field(
        default="on", description="Whether kbms serve pulls from the configured sources (off: API-only processes)"
    )
    sync_interval: float = Field(
        default=300.0, gt=0, description="Seconds between the incremental sweeps of each source by kbms serve"
    )
    # The operator console (kbms.api.console). A plain str for the reason given for sources: kbms serve hands a
    # secret it made to its workers as environment text.
    console_secret: str = Field(
        default="",
        repr=False,
        description="Key that signs console sessions (random per start when unset: sessions end with the process)",
    )
    console_session_ttl: int = Field(
        default=28_800, ge=60, le=31 * 86_400, description="Seconds a console sign-in lasts"
    )
    # Providers name their own secret variables (KBMS_INTERCOM_CLIENT_SECRET, ...): every KBMS_*_SECRET is kept.
    secrets: dict[str, SecretStr] = Field(default_factory=dict, exclude=True, repr=False)
    default_workspace: str = Field(
        default="default", pattern=WORKSPACE_PATTERN, description="Workspace of pushed conversations that name none"
    )

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_environment(cls, data: Any) -> Any:
        if isinstance(data, dict) and "secrets" not in data:
            found = {k: v for k, v in os.environ.items() if k.startswith("KBMS_") and k.endswith("_SECRET")}
            data = {**data, "secrets": found}
        return data

    def secret(self, variable: str) -> str:
        """The value of a secret variable, or "" when it is not set."""
        value = self.secrets.get(variable)
        return value.get_secret_value() if value is not None else ""

    @field_validator("log_level", "sync", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
