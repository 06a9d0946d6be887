"""The provider registry: the one place that lists providers. Adding one is a folder and a line here."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from kbms.errors import UnknownProvider
from kbms.providers.base import Provider
from kbms.providers.intercom import IntercomProvider
from kbms.providers.zendesk import ZendeskProvider

REGISTRY: Mapping[str, Provider] = MappingProxyType(
    {provider.name: provider for provider in (IntercomProvider(), ZendeskProvider())}
)
DEFAULT_PROVIDER = next(iter(REGISTRY))  # what `kbms ingest` reads when told nothing: the first one listed


def get_provider(name: str) -> Provider:
    """The registered provider of that name; ``UnknownProvider`` otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownProvider(name) from None


__all__ = ["DEFAULT_PROVIDER", "REGISTRY", "Provider", "get_provider"]
