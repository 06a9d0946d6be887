"""The sync state as Prometheus metrics, read from the database at each scrape.

The database is where the truth is shared: every process of ``kbms serve --workers N`` (and ``kbms sync`` run
beside them) adds to one set of totals there, so these series are read from it when a scrape comes, once, by
whichever worker answers, instead of being counted in each worker's memory and summed. Labels: provider and
workspace only (a source's token is never a label).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kbms.storage.base import SourceState

LABELS = ("provider", "workspace")
SECOND = 1_000_000


class SyncCollector(Collector):
    """Collects the sources' state given to it last (``update``), as read just before the scrape renders."""

    def __init__(self) -> None:
        self.states: Sequence[SourceState] = ()

    def update(self, states: Sequence[SourceState]) -> None:
        self.states = tuple(states)

    def collect(self) -> Iterator[Metric]:
        totals = {
            "listed": "Conversations listed as changed by the provider",
            "fetched": "Conversations fetched from the provider",
            "stored": "Fetched conversations stored (created, updated, unchanged or deleted)",
            "requests": "Requests made to the provider",
            "rate_limit_waits": "Times a client waited for the provider's rate-limit budget or a 429",
        }
        counters = {name: CounterMetricFamily(f"kbms_sync_{name}", doc, labels=LABELS) for name, doc in totals.items()}
        queue = GaugeMetricFamily("kbms_sync_queue_depth", "Fetches waiting or running", labels=LABELS)
        dead = GaugeMetricFamily("kbms_sync_dead_letters", "Conversations whose fetch failed for good", labels=LABELS)
        checkpoint = GaugeMetricFamily(
            "kbms_sync_checkpoint_timestamp_seconds", "Conversations updated before this are listed", labels=LABELS
        )
        finished = GaugeMetricFamily(
            "kbms_sync_last_pass_finished_timestamp_seconds", "When the source's last pass ended", labels=LABELS
        )
        failing = GaugeMetricFamily(
            "kbms_sync_failing", "1 when the source's last pass failed (unreachable, refused, a bug)", labels=LABELS
        )
        for state in self.states:
            labels = [state.provider, state.workspace]
            for name, family in counters.items():
                family.add_metric(labels, getattr(state.totals, name))
            queue.add_metric(labels, state.pending + state.running)
            dead.add_metric(labels, state.dead_letters)
            if state.checkpoint is not None:
                checkpoint.add_metric(labels, state.checkpoint / SECOND)
            if state.pass_finished_at is not None:
                finished.add_metric(labels, state.pass_finished_at / SECOND)
            failing.add_metric(labels, 1 if state.pass_outcome in ("unreachable", "refused", "failed") else 0)
        yield from counters.values()
        yield from (queue, dead, checkpoint, finished, failing)
