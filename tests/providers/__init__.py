"""Provider tests, one folder per provider, and ``SAMPLES``: what the generic tests need of each registered provider,
by name, so that they loop over the registry instead of naming providers."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tests.providers.intercom.samples import SAMPLES as INTERCOM
from tests.providers.zendesk.samples import SAMPLES as ZENDESK
from tests.support.samples import Samples

SAMPLES: Mapping[str, Samples] = MappingProxyType({"intercom": INTERCOM, "zendesk": ZENDESK})
