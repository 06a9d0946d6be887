"""What the generic tests need of a provider, without naming it: each ``tests/providers/<name>/samples.py`` gives
one ``Samples``, and ``tests.providers.SAMPLES`` lists them by provider name, beside the registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Samples:
    fixtures: Path
    """The provider's recorded payloads; its webhook deliveries are the ``*_webhook_*.json`` files."""
    push: Callable[[str], bytes]
    """A small valid pushed conversation with that external id."""
    webhook: bytes
    """A valid webhook delivery, as recorded; empty when the provider sends none."""
    sign: Callable[[bytes, str, datetime], Mapping[str, str]]
    """The headers that sign ``body`` with ``secret`` at ``now``, as the provider would send them."""
    documented_deliveries: tuple[tuple[Any, bool], ...] = ()
    """Deliveries and whether the documented webhook schema admits them: where one topic is told from another."""

    def recorded_deliveries(self) -> list[Path]:
        return sorted(self.fixtures.glob("*_webhook_*.json"))
