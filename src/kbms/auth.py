"""API keys: who may call what. Pure: no HTTP here (``kbms.api.auth`` applies it to requests).

A key is a random token shown once, when it is made (``kbms keys create``). kbms keeps only its SHA-256: keys are
256-bit random strings, so a fast hash is enough (nobody can guess a preimage), and looking a presented key up by
its hash compares no secret byte by byte. Each key has a name (for the operator and the logs), scopes, optionally
the workspaces it is limited to, and can be revoked without being deleted (so the logs still name it).

Scopes: ``read`` for ``/internal/*``, ``ingest`` for ``/integrations/*``, ``admin`` for ``/metrics``; ``admin``
includes the other two.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from kbms.model import WORKSPACE_PATTERN

Scope = Literal["read", "ingest", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
PREFIX = "kbms_"
# kbms_ + 43 characters of URL-safe base64 (32 random bytes): what a presented key must look like.
KEY_PATTERN = r"^kbms_[A-Za-z0-9_-]{43}$"
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Workspace = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=WORKSPACE_PATTERN)]


class KeyConfig(BaseModel):
    """One key as an operator configures it (``KBMS_API_KEYS`` or ``KBMS_API_KEYS_FILE``: a JSON list of these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    sha256: Sha256 = Field(description="SHA-256 (hex) of the key; the key itself is never stored")
    scopes: list[Scope] = Field(min_length=1)
    workspaces: list[Workspace] | None = Field(default=None, min_length=1, description="None: every workspace")
    revoked: bool = False


KEY_LIST = TypeAdapter(list[KeyConfig])


class KeyringError(ValueError):
    """The key configuration cannot be used (the server refuses to start rather than guess)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    scopes: frozenset[Scope]
    workspaces: frozenset[str] | None  # None: every workspace
    revoked: bool

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class Keyring:
    """The configured keys, by hash. Empty: authentication is off."""

    def __init__(self, keys: Iterable[KeyConfig]) -> None:
        self._by_hash: dict[str, ApiKey] = {}
        self._by_name: dict[str, ApiKey] = {}
        names: set[str] = set()
        for key in keys:
            if key.name in names:
                raise KeyringError(f"two API keys are named {key.name!r}")
            if key.sha256 in self._by_hash:
                raise KeyringError(f"API keys {key.name!r} and {self._by_hash[key.sha256].name!r} are the same key")
            names.add(key.name)
            workspaces = frozenset(key.workspaces) if key.workspaces is not None else None
            self._by_hash[key.sha256] = ApiKey(key.name, frozenset(key.scopes), workspaces, key.revoked)
            self._by_name[key.name] = self._by_hash[key.sha256]

    @classmethod
    def configured(cls, inline: str, file: Path | None) -> Keyring:
        """From ``KBMS_API_KEYS`` (JSON) and ``KBMS_API_KEYS_FILE`` (a JSON file); both may be set."""
        keys: list[KeyConfig] = []
        if inline.strip():
            keys += _parse(inline, source="KBMS_API_KEYS")
        if file is not None:
            try:
                text = file.read_text(encoding="utf-8")
            except OSError as exc:
                raise KeyringError(f"KBMS_API_KEYS_FILE {str(file)!r} cannot be read: {exc.strerror}") from None
            keys += _parse(text, source=f"KBMS_API_KEYS_FILE {str(file)!r}")
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._by_hash)

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, token: str) -> ApiKey | None:
        """The key this token is, revoked or not; None for a token that is no configured key."""
        return self._by_hash.get(digest(token))

    def named(self, name: str) -> ApiKey | None:
        """The key of this name, revoked or not (a console session names its key, never holds it)."""
        return self._by_name.get(name)


def _parse(text: str, *, source: str) -> list[KeyConfig]:
    try:
        return KEY_LIST.validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'list'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        raise KeyringError(f"{source} is not a valid list of API keys: {problems}") from None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh key: ``kbms_`` and 32 random bytes, URL-safe (recognisable in a secret scanner, safe in a header)."""
    return PREFIX + secrets.token_urlsafe(32)


def key_config(token: str, *, name: str, scopes: Iterable[Scope], workspaces: Iterable[str] | None) -> str:
    """The JSON entry an operator adds to the key list for ``token`` (it holds the hash, never the key)."""
    entry = KeyConfig(
        name=name,
        sha256=digest(token),
        scopes=sorted(set(scopes)),
        workspaces=sorted(set(workspaces)) if workspaces else None,
    )
    return entry.model_dump_json(exclude_none=True, exclude={"revoked"})
