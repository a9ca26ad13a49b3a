"""The micro-batch pipeline: validate -> dead-letter -> score -> apply -> store -> publish, with its
metrics. It knows records, not Kafka's loop: `gnaq_stream.stream.consumer` feeds it polled records,
tests and benchmarks feed it directly.

Order is what makes a crash safe: the bad messages reach the dead-letter topic (every send
acknowledged) before anything of the batch is applied, and the batch is stored with its offsets in
one WriteBatch before they are committed. A failure before the store write raises and leaves model,
store and offsets as they were, so the same records can be processed again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from kafka import KafkaProducer

from gnaq_stream.config import ConsumerConfig, LearnerConfig
from gnaq_stream.data.events import Event, Rejection, parse_event
from gnaq_stream.metrics import LearnerMetrics
from gnaq_stream.quant.packing import model_size
from gnaq_stream.store.embedding_store import EmbeddingStore
from gnaq_stream.stream.consolidation import earned
from gnaq_stream.stream.learner import BatchResult, StreamLearner
from gnaq_stream.stream.prequential import KS, PrequentialEvaluator
from gnaq_stream.stream.sending import send_all
from gnaq_stream.stream.updates import UpdatesPublisher

log = logging.getLogger("gnaq_stream.pipeline")
# a dead-letter copy must fit one Kafka request (1 MiB by default) whatever the original's size
DLQ_MAX_VALUE_BYTES = 512 * 1024
DLQ_MAX_KEY_BYTES = 1024


class Record(Protocol):
    """What the pipeline reads of a consumed message (kafka-python's ConsumerRecord has it)."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # ms
    key: bytes | None
    value: bytes | None


def _too_large(rec: Record, limit: int) -> Rejection | None:
    if rec.key is not None and len(rec.key) > limit:
        return Rejection("too_large", f"key of {len(rec.key)} bytes, limit {limit}")
    return None


class MicroBatchPipeline:
    def __init__(self, learner: StreamLearner, store: EmbeddingStore, metrics: LearnerMetrics | None = None,
                 max_message_bytes: int = 4096, max_nodes: int = 0,
                 snapshot_min_events: int = ConsumerConfig.snapshot_min_events):
        self.learner, self.store = learner, store
        self.metrics = metrics or LearnerMetrics()
        self.max_message_bytes, self.max_nodes = max_message_bytes, max_nodes
        self.snapshot_min_events = snapshot_min_events
        self.snapshot_events = store.snapshot_meta()["events"]
        self._snapshot: threading.Thread | None = None  # the snapshot being written, if any
        self._snapshot_done: tuple[int, Exception | None] = (self.snapshot_events, None)  # set by its thread
        self.refreshes_seen = learner.refreshes
        cfg = learner.cfg
        self.prequential = PrequentialEvaluator(cfg.prequential_window, cfg.prequential_sample, cfg.seed,
                                                cfg.prequential_max_scores)
        self.budget = 0.0  # consolidation training pairs earned by applied events, spent while idle
        self.consolidated_pairs = 0
        self.producer: KafkaProducer | None = None
        self.dlq_topic = ""
        self.updates: UpdatesPublisher | None = None
        self.pending_users = np.zeros(0, dtype=np.int64)  # users whose history is not yet published
        # nodes added since the last publication: their rows go out with the next one (not 404)
        self.new_users = self.new_items = np.zeros(0, dtype=np.int64)
        self.update_model_metrics()

    def connect(self, producer: KafkaProducer, dlq_topic: str, updates: UpdatesPublisher | None = None) -> None:
        """Where dead letters and serving rows go (any object with KafkaProducer's send/flush)."""
        self.producer, self.dlq_topic, self.updates = producer, dlq_topic, updates

    # ---- one micro-batch ------------------------------------------------------------------------

    def process(self, records: Sequence[Record]) -> dict[tuple[str, int], int]:
        """Apply and store one micro-batch; returns the next offset of every partition it read, to be
        committed. Raises a KafkaError (dead letters not acknowledged) with nothing applied or stored,
        or StoreError (write failed): nothing stored, but the model in memory is then ahead of the
        store, so the caller must stop (a restart reloads the store)."""
        start = time.perf_counter()
        m, limit = self.metrics, self.max_message_bytes
        parsed = [_too_large(rec, limit) or parse_event(rec.value, limit) for rec in records]
        if self.max_nodes:
            self._refuse_beyond_node_limit(parsed)
        events: list[Event] = [p for p in parsed if type(p) is Event]
        rejected = [(r, p) for r, p in zip(records, parsed) if type(p) is Rejection]
        stamps = np.array([r.timestamp for r, p in zip(records, parsed) if type(p) is Event], dtype=np.float64) / 1000
        # a partition's records come in offset order, so its last one gives the next offset
        offsets = {(rec.topic, rec.partition): rec.offset + 1 for rec in records}
        if rejected:
            self._dead_letter(rejected)
        self.prequential.score(self.learner, events)
        result = self.learner.apply_micro_batch(events)
        self.store.write(self.learner.changes(result, offsets))
        self._snapshot_if_due()
        if self.updates is not None:
            g = self.learner.graph
            self.pending_users = np.union1d(self.pending_users, result.event_users)
            self.new_users = np.union1d(self.new_users, np.arange(g.n_users - len(result.new_users), g.n_users))
            self.new_items = np.union1d(self.new_items, np.arange(g.n_items - len(result.new_items), g.n_items))
        applied_at = time.time()
        m.events_consumed.inc(len(records))
        m.events_applied.inc(len(events))
        for _, rej in rejected:
            m.events_rejected.labels(rej.reason).inc()
        m.freshness_seconds.observe(np.maximum(applied_at - stamps, 0.0))
        m.refine_seconds.observe(result.refine_seconds)
        elapsed = time.perf_counter() - start
        m.micro_batch_seconds.observe(elapsed)
        self.budget = earned(self.learner.cfg, self.budget, len(events), self.learner.graph.n_edges)
        self.update_model_metrics()
        return offsets

    def _snapshot_if_due(self) -> None:
        """Renew the store's graph snapshot once the log since the last one holds max(snapshot_min_events,
        edges / 4) events: a restart replays at most a quarter of the graph's size in events (replay
        costs more per event than reading the snapshot), and a snapshot's O(edges) cost is spread
        over at least edges / 4 events. The edges are copied here; a background thread writes them
        while micro-batches go on (one snapshot at a time)."""
        if self._snapshot is not None:
            if self._snapshot.is_alive():
                return
            self.wait_snapshot()
        g = self.learner.graph
        if g.n_events - self.snapshot_events < max(self.snapshot_min_events, g.n_edges // 4):
            return
        edges = tuple(column.astype(np.uint32) for column in g.edges())  # the store's width: 12 bytes an edge
        self._snapshot = threading.Thread(target=self._write_snapshot, name="graph-snapshot", daemon=True,
                                          args=(self.learner.version, g.n_events, edges))
        self._snapshot.start()

    def _write_snapshot(self, version: int, n_events: int, edges: tuple[np.ndarray, ...]) -> None:
        start = time.perf_counter()
        try:
            self.store.write_snapshot(version, n_events, *edges)
        except Exception as exc:  # raised on the loop's thread by wait_snapshot
            self._snapshot_done = (self.snapshot_events, exc)
            return
        elapsed = time.perf_counter() - start
        self.metrics.snapshot_seconds.observe(elapsed)
        log.info("graph snapshot at model version %d: %d edges in %.1fs", version, len(edges[0]), elapsed)
        self._snapshot_done = (n_events, None)

    def wait_snapshot(self) -> None:
        """Wait until the snapshot being written (if any) is in the store; its error (a StoreError) if it
        failed (the previous snapshot and the log then still hold the graph)."""
        if self._snapshot is None:
            return
        self._snapshot.join()
        self._snapshot = None
        self.snapshot_events, error = self._snapshot_done
        if error is not None:
            raise error

    def close(self) -> None:
        """Finish the snapshot in flight (before the store closes); a failed one is logged: nothing is
        lost, the next start reads the previous snapshot and the log."""
        try:
            self.wait_snapshot()
        except Exception as exc:
            log.error("graph snapshot failed at stop: %s", exc)

    def _refuse_beyond_node_limit(self, parsed: list) -> None:
        """Events that would grow a node kind past `max_nodes` become `node_limit` rejections."""
        g = self.learner.graph
        if max(g.n_users, g.n_items) + len(parsed) <= self.max_nodes:
            return  # cannot reach the limit in this batch
        for kind, ids, attr in (("user", g.users, 0), ("item", g.items, 1)):
            fresh: set[str] = set()
            for k, p in enumerate(parsed):
                if type(p) is not Event or ids.get(p[attr]) is not None or p[attr] in fresh:
                    continue
                if len(ids) + len(fresh) >= self.max_nodes:
                    parsed[k] = Rejection("node_limit", f"{kind} {p[attr][:64]!r} would exceed --max-nodes "
                                                        f"{self.max_nodes} {kind}s")
                else:
                    fresh.add(p[attr])

    def _dead_letter(self, rejected: list[tuple[Record, Rejection]]) -> None:
        records = []
        for rec, rej in rejected:
            key, value = rec.key, rec.value or b""
            headers = [("reason", rej.reason.encode()), ("detail", rej.detail.encode()),
                       ("source", f"{rec.topic}:{rec.partition}:{rec.offset}".encode())]
            if len(value) > DLQ_MAX_VALUE_BYTES or (key is not None and len(key) > DLQ_MAX_KEY_BYTES):
                headers += [("truncated", b"true"), ("value_bytes", str(len(value)).encode()),
                            ("key_bytes", str(len(key or b"")).encode())]
                key, value = key and key[:DLQ_MAX_KEY_BYTES], value[:DLQ_MAX_VALUE_BYTES]
            records.append((self.dlq_topic, key, value, headers))
        self._send_dead_letters(records)
        self.metrics.dlq_truncated.inc(sum(("truncated", b"true") in headers for *_, headers in records))

    def _send_dead_letters(self, records: list) -> None:
        try:
            send_all(self.producer, records)
        except Exception:
            self.metrics.publish_failures.labels("dlq").inc()
            raise

    def skip(self, topic: str, partition: int, first: int, next_offset: int, detail: str) -> dict[tuple[str, int], int]:
        """A record batch that cannot be decoded (offsets first..next_offset-1): one dead letter
        naming the range (its bytes are unreadable), then the partition's offset stored past it.
        Returns the offsets to commit; raises like `process` with nothing stored."""
        record = (self.dlq_topic, None, b"", [("reason", b"undecodable"), ("detail", detail.encode()),
                                               ("source", f"{topic}:{partition}:{first}".encode()),
                                               ("offsets", f"{first}-{next_offset - 1}".encode())])
        self._send_dead_letters([record])
        offsets = {(topic, partition): next_offset}
        self.store_positions(offsets, {})
        self.metrics.events_rejected.labels("undecodable").inc()
        return offsets

    def store_positions(self, offsets: dict[tuple[str, int], int], topic_ids: dict[str, str]) -> None:
        """Store offsets and the ids of the topics they refer to, nothing else (e.g. a re-created topic
        read from its beginning)."""
        learner = self.learner
        change = learner.changes(BatchResult(learner.version, 0), offsets)
        change.topic_ids = topic_ids
        self.store.write(change)

    # ---- serving rows ---------------------------------------------------------------------------

    def publish(self, refresh: bool = False, everyone: bool = False) -> None:
        """Publish the histories of the users touched since the last publication (`everyone`: all
        users) and the current serving rows of the nodes added since; and, when the learner
        propagated since, everyone's changed serving rows. Propagation is every `refresh_seconds` at
        most, or now with `refresh`. Raises a KafkaError if any send failed: nothing is then counted
        as published, and the next call repeats it.

        Only new nodes' rows go out per batch: rows of every touched user cost the learner most of
        its rate at 20,000 events/s on ml-1m, where a batch touches most users (docs/benchmarks.md,
        "Freshness"); an existing user's row waits for the next propagation, their history does not."""
        if self.updates is None:
            return
        learner = self.learner
        learner.refresh_final_embeddings(force=refresh and learner.final_version != learner.version)
        users = np.arange(learner.graph.n_users) if everyone else self.pending_users
        published, start = self.updates.published_version, time.perf_counter()
        try:
            sent = self.updates.publish(learner, users, (self.new_users, self.new_items))
        except Exception:
            self.metrics.publish_failures.labels("updates").inc()
            raise
        if self.updates.published_version != published:
            # sending a propagation's changed rows is part of its cost: on a large graph it exceeds the
            # propagation itself, and the refresh period backs off from both (`refresh_max_share`)
            learner.publish_cost = time.perf_counter() - start
        self.pending_users = self.new_users = self.new_items = np.zeros(0, dtype=np.int64)
        self.metrics.rows_published.inc(sent)
        self.update_model_metrics()

    @property
    def publication_behind(self) -> bool:
        """The replicas have not received the model's latest version."""
        return self.updates is not None and (self.learner.final_version != self.learner.version
                                             or self.updates.published_version != self.learner.final_version)

    # ---- idle-time consolidation ----------------------------------------------------------------

    def can_consolidate(self, idle_seconds: float) -> bool:
        return idle_seconds >= self.learner.cfg.consolidate_after_idle_seconds and self.budget > 0

    def consolidate(self) -> BatchResult:
        """One slice of full-graph training, stored like a micro-batch (offsets unchanged)."""
        start = time.perf_counter()
        learner = self.learner
        result, trained = learner.consolidate(math.ceil(self.budget), learner.cfg.consolidate_slice_seconds)
        self.store.write(learner.changes(result, {}))
        self.budget = max(self.budget - trained, 0.0)
        self.consolidated_pairs += trained
        self.metrics.consolidate_seconds.inc(time.perf_counter() - start)
        self.metrics.consolidated_pairs.inc(trained)
        self.update_model_metrics()
        if self.budget == 0.0:
            log.info("consolidated: %d training pairs over the whole graph; model version %d",
                     self.consolidated_pairs, learner.version)
            self.consolidated_pairs = 0
        return result

    def update_model_metrics(self) -> None:
        m, learner, g = self.metrics, self.learner, self.learner.graph
        if learner.refreshes != self.refreshes_seen:
            m.refresh_seconds.observe(learner.refresh_cost)
            self.refreshes_seen = learner.refreshes
        cfg: LearnerConfig = learner.cfg
        size = model_size(g.n_users + g.n_items, cfg.dim, cfg.bits, cfg.level_dtype)
        m.nodes.labels("user").set(g.n_users)
        m.nodes.labels("item").set(g.n_items)
        m.edges.set(g.n_edges)
        m.model_bytes.set(size.bytes_model)
        m.fp32_bytes.set(size.bytes_fp32)
        m.compression.set(size.compression if size.bytes_model else 0)
        m.consolidate_budget.set(self.budget)  # before the version: a reader seeing the version sees it too
        m.model_version.set(learner.version)
        acc = self.prequential.metrics()
        for k in KS:
            if acc:
                m.recall.labels(str(k)).set(acc[f"recall@{k}"])
                m.ndcg.labels(str(k)).set(acc[f"ndcg@{k}"])
        m.prequential_events.set(len(self.prequential.ranks))
