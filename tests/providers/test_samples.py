"""Every registered provider has the samples the generic tests take from ``tests.providers.SAMPLES``."""

from __future__ import annotations

from datetime import UTC, datetime

from kbms.providers import REGISTRY, get_provider
from tests.providers import SAMPLES

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_every_registered_provider_has_samples() -> None:
    assert set(SAMPLES) == set(REGISTRY)


def test_the_samples_are_what_they_say() -> None:
    for name, samples in SAMPLES.items():
        provider = get_provider(name)
        snapshot = provider.parse_push(samples.push("sample-1"), workspace="acme", default_workspace="default")
        assert (snapshot.provider, snapshot.external_id) == (name, "sample-1")
        webhooks = provider.webhooks
        if webhooks is None:
            continue
        assert samples.recorded_deliveries(), name
        signed = samples.sign(samples.webhook, "a-secret", NOW)
        assert webhooks.verify(samples.webhook, signed, "a-secret", now=NOW), name
        assert not webhooks.verify(samples.webhook, signed, "another-secret", now=NOW), name
