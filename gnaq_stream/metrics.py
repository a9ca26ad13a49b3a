"""Every Prometheus metric of the project, defined once. Labels have bounded cardinality."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gnaq_stream.data.events import DEAD_LETTER_REASONS

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 30.0)


class BatchHistogram(Collector):
    """A histogram observed a whole array at a time: `Histogram.observe` costs about a microsecond
    per value, too much for one observation per event at tens of thousands of events a second."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = np.array([*buckets, float("inf")])
        self.counts = np.zeros(len(self.bounds), dtype=np.int64)
        self.total = 0.0
        self.lock = threading.Lock()  # collect() runs on the metrics server's thread
        registry.register(self)

    def observe(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        added = np.bincount(np.searchsorted(self.bounds, values), minlength=len(self.bounds))  # value <= le
        with self.lock:
            self.counts += added
            self.total += float(values.sum())

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self.lock:
            cumulative, total = np.cumsum(self.counts).tolist(), self.total
        yield HistogramMetricFamily(self.name, self.documentation, sum_value=total,
                                    buckets=[(floatToGoString(b), c) for b, c in zip(self.bounds.tolist(), cumulative)])


class LearnerMetrics:
    """Metrics of `gnaq-stream consume`, on their own registry (no process-global state)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.events_consumed = Counter("gnaq_events_consumed_total", "Messages read from the interactions topic",
                                       registry=r)
        self.events_applied = Counter("gnaq_events_applied_total", "Valid events applied to the model", registry=r)
        self.events_rejected = Counter("gnaq_events_rejected_total", "Messages sent to the dead-letter topic",
                                       ["reason"], registry=r)
        for reason in DEAD_LETTER_REASONS:
            self.events_rejected.labels(reason)
        self.micro_batch_seconds = Histogram("gnaq_micro_batch_seconds", "Wall time to apply and persist a micro-batch",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.refine_seconds = Histogram("gnaq_refine_seconds", "Wall time of a micro-batch's refinement pass",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.snapshot_seconds = Histogram("gnaq_snapshot_seconds", "Wall time to write the store's graph snapshot",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.refresh_seconds = Histogram("gnaq_refresh_seconds", "Wall time of a full-graph propagation",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.consolidate_seconds = Counter("gnaq_consolidate_seconds_total", "Wall time of idle-time full-graph "
                                           "training (consolidation), store write included", registry=r)
        self.consolidated_pairs = Counter("gnaq_consolidated_pairs_total", "Training pairs of idle-time full-graph "
                                          "training (consolidation)", registry=r)
        self.consolidate_budget = Gauge("gnaq_consolidate_budget_pairs",
                                        "Consolidation training pairs earned by streaming and not yet spent", registry=r)
        self.freshness_seconds = BatchHistogram("gnaq_freshness_seconds",
                                                "Kafka record timestamp to the event being applied and stored",
                                                _LATENCY_BUCKETS, r)
        self.consumer_lag = Gauge("gnaq_consumer_lag_messages", "High-water mark minus position", ["partition"],
                                  registry=r)
        self.nodes = Gauge("gnaq_nodes", "Nodes in the graph", ["kind"], registry=r)
        self.edges = Gauge("gnaq_edges", "Distinct user-item edges in the graph", registry=r)
        self.model_bytes = Gauge("gnaq_model_bytes", "Bytes of packed codes and levels for all nodes", registry=r)
        self.fp32_bytes = Gauge("gnaq_model_fp32_bytes", "Bytes the same embeddings would take in float32",
                                registry=r)
        self.compression = Gauge("gnaq_compression_ratio", "fp32 bytes / model bytes", registry=r)
        self.model_version = Gauge("gnaq_model_version", "Micro-batches applied since the store was created",
                                   registry=r)
        self.recall = Gauge("gnaq_stream_recall_at_k", "Prequential Recall@K over the sliding window", ["k"],
                            registry=r)
        self.ndcg = Gauge("gnaq_stream_ndcg_at_k", "Prequential NDCG@K over the sliding window", ["k"], registry=r)
        self.rows_published = Counter("gnaq_updates_rows_published_total",
                                      "Serving rows sent to the embedding-updates topic", registry=r)
        self.prequential_events = Gauge("gnaq_stream_prequential_events", "Events in the prequential window",
                                        registry=r)
        self.gc_seconds = Counter("gnaq_gc_seconds_total", "Wall time in Python's cyclic garbage collector",
                                  registry=r)
        self.events_skipped = Counter("gnaq_events_skipped_total", "Offsets that could not be read: deleted before "
                                      "they were read (retention), or the topic was re-created", ["partition"],
                                      registry=r)
        self.publish_failures = Counter("gnaq_publish_failures_total", "Failed sends to the dead-letter or updates "
                                        "topic (nothing of that batch was stored or counted as published)", ["topic"],
                                        registry=r)
        for topic in ("dlq", "updates"):
            self.publish_failures.labels(topic)
        self.dlq_truncated = Counter("gnaq_dlq_truncated_total", "Dead-letter copies cut to fit a Kafka request "
                                     "(the original stays at its source offset)", registry=r)
        self.owns_all_partitions = Gauge("gnaq_owns_all_partitions", "1 while this learner owns every partition "
                                         "of its topic (it applies nothing otherwise)", registry=r)

    def time_gc(self) -> None:
        """Count the time of every garbage collection in `gc_seconds` (gc.callbacks; once per process)."""
        started = [0.0]

        def callback(phase: str, _info: dict) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                self.gc_seconds.inc(time.perf_counter() - started[0])

        gc.callbacks.append(callback)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP (loopback unless told otherwise)."""
        start_http_server(port, addr=host, registry=self.registry)


class ServeMetrics:
    """Metrics of a recommender replica (`gnaq-stream serve`), served on its own /metrics page."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("gnaq_serve_requests_total", "HTTP requests answered", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("gnaq_serve_request_seconds", "Time to answer a request", ["endpoint"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.updates_applied = Counter("gnaq_serve_updates_applied_total", "Update records applied", registry=r)
        self.updates_stale = Counter("gnaq_serve_updates_stale_total", "Update records ignored because a newer one "
                                     "was held, and tombstones of keys not held", registry=r)
        self.updates_rejected = Counter("gnaq_serve_updates_rejected_total", "Update records not applied: malformed, "
                                        "a row of another width than the model's, an index beyond the replica's "
                                        "cap, or from a partition other than 0", ["reason"], registry=r)
        self.model_version = Gauge("gnaq_serve_model_version", "Learner version this replica has completely received",
                                   registry=r)
        self.updates_lag = Gauge("gnaq_serve_updates_lag_messages", "Updates-topic high-water mark minus position",
                                 ["partition"], registry=r)
        self.model_bytes = Gauge("gnaq_serve_model_bytes", "Bytes of the packed serving rows held (row width x "
                                 "rows; the replica's whole memory is gnaq_serve_memory_bytes)", registry=r)
        self.memory_bytes = Gauge("gnaq_serve_memory_bytes", "Estimated bytes the replica holds in memory: rows as "
                                  "allocated, versions, ids, user index, histories, with Python object overheads",
                                  registry=r)
        self.nodes = Gauge("gnaq_serve_nodes", "Nodes with a serving row", ["kind"], registry=r)
