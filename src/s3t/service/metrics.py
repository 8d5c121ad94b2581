"""Prometheus metrics of one service process (its own registry, so several apps can share a process).

Counters and histograms are updated by the service as requests are handled; the run's state (served
depth and capacity per shard, served-set version, pending holds, restoration) is read from the registry
when /metrics is scraped, so it is right even after another process (the restoration child) changed it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()   # no `*_created` series: they double the output and nobody here reads them
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _RunState(Collector):
    """Gauges computed at scrape time from `state()`: {status, pending_holds, restoring, batches, batched, queued}."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = self.state()
        yield CounterMetricFamily("s3t_deletion_batches", "Group commits of deletion requests (transactions)",
                                  value=state["batches"])
        yield CounterMetricFamily("s3t_deletion_batched_requests", "Deletion requests and review decisions "
                                  "applied by those group commits", value=state["batched"])
        yield GaugeMetricFamily("s3t_deletion_queue", "Deletion requests waiting for the next group commit",
                                value=state["queued"])
        status = state["status"]
        depth = GaugeMetricFamily("s3t_served_depth", "Layer groups in use by each shard's served model "
                                  "(0: out of the ensemble)", labels=["shard"])
        capacity = GaugeMetricFamily("s3t_shard_capacity", "Fewest further deletions that take the shard out "
                                     "of the ensemble", labels=["shard"])
        for s in status.shards:
            depth.add_metric([str(s.shard)], s.served_depth)
            capacity.add_metric([str(s.shard)], s.deletions_to_drop)
        yield depth
        yield capacity
        yield GaugeMetricFamily("s3t_served_version", "Version of the served set", value=status.served_version)
        yield GaugeMetricFamily("s3t_truncated_orders", "Orders below full depth", value=status.truncated_orders)
        yield GaugeMetricFamily("s3t_live_records", "Records not deleted", value=status.live_records)
        yield GaugeMetricFamily("s3t_stale_orders", "Orders with a trained stage that misses added records",
                                value=status.stale_orders)
        yield GaugeMetricFamily("s3t_unseen_records", "Live records the served model has not seen",
                                value=status.unseen_records)
        yield GaugeMetricFamily("s3t_held_requests", "Deletion requests held for an admin's review",
                                value=state["pending_holds"])
        yield GaugeMetricFamily("s3t_restoration_running", "1 while a restoration child is training",
                                value=1 if state["restoring"] else 0)


class Metrics:
    """The service's counters and histograms, plus the run-state gauges."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.deletion_requests = Counter("s3t_deletion_requests", "Deletion requests answered, by outcome "
                                         "(applied, replayed, held)", ["outcome"], registry=r)
        self.deleted_records = Counter("s3t_deleted_records", "Records deleted", registry=r)
        self.added_records = Counter("s3t_added_records", "Records added", registry=r)
        self.deletion_latency = Histogram("s3t_deletion_latency_seconds", "Time to apply and commit a deletion",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.prediction_requests = Counter("s3t_prediction_requests", "Prediction requests answered", registry=r)
        self.predicted_texts = Counter("s3t_predicted_texts", "Texts classified", registry=r)
        self.prediction_latency = Histogram("s3t_prediction_latency_seconds", "Time to answer a prediction",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("s3t_rejected_requests", "Requests refused, by reason", ["reason"], registry=r)
        self.guard_flags = Counter("s3t_guard_flags", "Deletion requests the capacity guard flagged, by action",
                                   ["action"], registry=r)
        self.restorations = Counter("s3t_restorations", "Restoration runs, by outcome", ["outcome"], registry=r)
        self.restored_orders = Counter("s3t_restored_orders", "Orders brought back to full depth", registry=r)
        r.register(_RunState(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
