"""`gnaq-stream consume`: the Kafka loop around the learner.

Resume contract: offsets live in the embedding store, written in the same atomic WriteBatch as the
micro-batch they belong to, and are committed to Kafka only after that write. On (re)assignment a
partition is positioned at the offset stored with the data, so a crash at any point loses no event
and applies none twice. Bad messages go to the dead-letter topic (flushed before the batch is
stored); after a crash between that flush and the store write they may appear there twice.
"""

from __future__ import annotations

import gc
import logging
import signal
import time

import numpy as np

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from gnaq_stream.checkpoint import load_checkpoint
from gnaq_stream.config import ConsumerConfig, LearnerConfig
from gnaq_stream.data.events import Event, Rejection, parse_event
from gnaq_stream.metrics import LearnerMetrics
from gnaq_stream.quant.packing import model_size
from gnaq_stream.store.embedding_store import EmbeddingStore
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.prequential import KS, PrequentialEvaluator
from gnaq_stream.stream.updates import UpdatesPublisher

log = logging.getLogger("gnaq_stream.consume")


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, owner: "StreamConsumer"):
        self.owner = owner

    def on_partitions_revoked(self, revoked) -> None:
        # records not yet stored are re-read by whoever owns the partition next
        revoked = set(revoked)
        self.owner.pending = [r for r in self.owner.pending if TopicPartition(r.topic, r.partition) not in revoked]

    def on_partitions_assigned(self, assigned) -> None:
        stored = self.owner.store.offsets()
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                self.owner.consumer.seek(tp, offset)
        self.owner.last_activity = time.monotonic()  # the idle clock starts once there is something to read
        log.info("assigned %s", sorted((tp.partition, stored.get((tp.topic, tp.partition))) for tp in assigned))


def _retry(what: str, action, should_stop, max_backoff: float = 10.0):
    """Run `action` until it succeeds, backing off exponentially while Kafka is unreachable."""
    backoff = 0.5
    while True:
        try:
            return action()
        except KafkaError as exc:
            if should_stop():
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)


class StreamConsumer:
    def __init__(self, ccfg: ConsumerConfig, lcfg: LearnerConfig, metrics: LearnerMetrics | None = None):
        self.ccfg, self.metrics = ccfg, metrics or LearnerMetrics()
        self.dlq_topic = ccfg.dlq_topic or f"{ccfg.topic}-dlq"
        self.stop_requested = False
        self.pending: list = []
        self.consumed = 0
        self.budget = 0.0  # consolidation seconds earned by micro-batches, spent while idle
        self.consolidated_steps = 0
        self.last_activity = time.monotonic()
        self.store = EmbeddingStore(ccfg.store)
        if self.store.is_empty():
            if ccfg.checkpoint:
                self.learner = StreamLearner.from_checkpoint(load_checkpoint(ccfg.checkpoint), lcfg)
            else:
                self.learner = StreamLearner(lcfg)
            self.store.write_initial(self.learner)
        else:
            if ccfg.checkpoint:
                log.info("store %s already holds a model; resuming from it, not from %s", ccfg.store, ccfg.checkpoint)
            self.learner = self.store.load_learner(lcfg)
        # the loaded model (hundreds of thousands of lists and strings) lives as long as the process;
        # kafka-python's allocations trigger full collections that rescanned it every time: 0.89 s vs
        # 0.07 s of GC per 160k events (benchmarks/stream_throughput.py --compare-gc-freeze)
        gc.freeze()
        self.prequential = PrequentialEvaluator(lcfg.prequential_window, lcfg.prequential_sample, lcfg.seed)
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.updates: UpdatesPublisher | None = None
        self._update_model_metrics()

    # ---- lifecycle ------------------------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        self.stop_requested = True

    def _connect(self) -> None:
        c = self.ccfg
        common = dict(bootstrap_servers=c.bootstrap_servers.split(","), reconnect_backoff_max_ms=5000,
                      bootstrap_timeout_ms=5000)
        self.consumer = _retry("connecting consumer", lambda: KafkaConsumer(
            group_id=c.group, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=c.micro_batch_size, fetch_max_bytes=c.fetch_max_bytes,
            max_partition_fetch_bytes=min(c.fetch_max_bytes, 1024 * 1024),
            session_timeout_ms=c.session_timeout_ms, heartbeat_interval_ms=c.heartbeat_interval_ms,
            max_poll_interval_ms=300000, **common), lambda: self.stop_requested)
        self.consumer.subscribe([c.topic], listener=_SeekToStoredOffsets(self))
        self.producer = _retry("connecting producer", lambda: KafkaProducer(
            acks="all", linger_ms=5, batch_size=256 * 1024, **common), lambda: self.stop_requested)
        if c.updates_topic:
            self.updates = UpdatesPublisher(self.producer, c.updates_topic,
                                            self.learner.cfg.serve_bits or self.learner.cfg.bits)
            # a (re)started learner publishes its whole state: the topic may miss what a crash cut off
            self._publish_updates(self.learner.graph.n_users, refresh=True)

    def run(self) -> int:
        """Consume until stopped (signal, --max-events or --idle-exit); returns events consumed."""
        c = self.ccfg
        try:
            self._connect()
        except KafkaError:
            self.close()
            return self.consumed
        first_pending = self.last_activity = time.monotonic()
        while not self.stop_requested:
            room = c.micro_batch_size - len(self.pending)
            if c.max_events:
                room = min(room, c.max_events - self.consumed - len(self.pending))
            polled = self.consumer.poll(timeout_ms=100, max_records=max(room, 1)) if room > 0 else {}
            now = time.monotonic()
            for records in polled.values():
                if not self.pending:
                    first_pending = now
                self.pending.extend(records)
                self.last_activity = now
            self._update_lag()
            idle = not polled and not self.pending
            if idle and self._can_consolidate(now):
                self._consolidate()
            elif self.updates and idle and self.learner.final_version != self.learner.version:
                self._publish_updates(0, refresh=True)  # idle: let the replicas catch up fully
            full = len(self.pending) >= c.micro_batch_size or (c.max_events and room <= 0)
            if self.pending and (full or now - first_pending >= c.max_wait_seconds):
                self._process(self.pending)
                self.pending = []
            if c.max_events and self.consumed >= c.max_events:
                break
            if c.idle_exit and not self.pending and now - self.last_activity >= c.idle_exit:
                log.info("no messages for %.1fs; exiting", c.idle_exit)
                break
        if self.pending:
            self._process(self.pending)
            self.pending = []
        self._publish_updates(0, refresh=True)
        self.close()
        return self.consumed

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None
        if self.producer is not None:
            self.producer.close(timeout=5)
            self.producer = None
        self.store.close()

    # ---- one micro-batch ------------------------------------------------------------------------

    def _process(self, records: list) -> None:
        start = time.perf_counter()
        m = self.metrics
        limit = self.ccfg.max_message_bytes
        parsed = [parse_event(rec.value, limit) for rec in records]
        events: list[Event] = [p for p in parsed if type(p) is Event]
        rejected = [(r, p) for r, p in zip(records, parsed) if type(p) is Rejection]
        stamps = np.array([r.timestamp for r, p in zip(records, parsed) if type(p) is Event], dtype=np.float64) / 1000
        # a partition's records are pending in offset order, so its last one gives the next offset
        offsets = {(rec.topic, rec.partition): rec.offset + 1 for rec in records}
        if rejected:
            self._dead_letter(rejected)
        self.prequential.score(self.learner, events)
        result = self.learner.apply_micro_batch(events)
        self.store.write_batch(self.learner, result, offsets)
        self._publish_updates(result.event_users)
        self._commit(offsets)
        applied_at = time.time()
        self.consumed += len(records)
        m.events_consumed.inc(len(records))
        m.events_applied.inc(len(events))
        for rec, rej in rejected:
            m.events_rejected.labels(rej.reason).inc()
        m.freshness_seconds.observe(np.maximum(applied_at - stamps, 0.0))
        m.refine_seconds.observe(result.refine_seconds)
        elapsed = time.perf_counter() - start
        m.micro_batch_seconds.observe(elapsed)
        self.budget += self.learner.cfg.consolidate_ratio * elapsed
        self._update_model_metrics()

    def _can_consolidate(self, now: float) -> bool:
        quiet = now - self.last_activity >= self.learner.cfg.consolidate_after_idle_seconds
        return quiet and self.budget > 0 and self.learner.graph.n_edges > 0  # no budget accrues at ratio 0

    def _consolidate(self) -> None:
        """One slice of idle-time full-graph training, stored like a micro-batch (offsets unchanged)."""
        start = time.perf_counter()
        result, steps = self.learner.consolidate(min(self.budget, self.learner.cfg.consolidate_slice_seconds))
        self.store.write_batch(self.learner, result, {})
        spent = time.perf_counter() - start
        self.budget = max(self.budget - spent, 0.0)
        self.consolidated_steps += steps
        self.metrics.consolidate_seconds.inc(spent)
        self._update_model_metrics()
        if self.budget == 0.0:
            log.info("consolidated: %d full-graph steps; model version %d", self.consolidated_steps,
                     self.learner.version)
            self.consolidated_steps = 0

    def _dead_letter(self, rejected: list[tuple]) -> None:
        def publish():
            for rec, rej in rejected:
                headers = [("reason", rej.reason.encode()), ("detail", rej.detail.encode()),
                           ("source", f"{rec.topic}:{rec.partition}:{rec.offset}".encode())]
                self.producer.send(self.dlq_topic, value=rec.value or b"", key=rec.key, headers=headers)
            self.producer.flush(timeout=30)
        # a bad message must reach the DLQ before its offset is stored: retry even while stopping
        _retry("publishing to the dead-letter topic", publish, lambda: False)

    def _publish_updates(self, users: np.ndarray | int, refresh: bool = False) -> None:
        """Publish histories of `users` (an int n: users 0..n-1) and, when the learner propagated
        since the last publication, its changed serving rows; propagation is every `refresh_seconds`
        at most, or now with `refresh`. A publication that cannot be completed while stopping is
        left to the next start, which republishes everything."""
        if self.updates is None:
            return
        self.learner.refresh_final_embeddings(force=refresh and self.learner.final_version != self.learner.version)
        users = np.arange(users) if isinstance(users, int) else np.unique(users)
        try:
            sent = _retry("publishing embedding updates", lambda: self.updates.publish(self.learner, users),
                          lambda: self.stop_requested)
        except KafkaError as exc:
            log.warning("embedding updates not published (%s); the next start republishes them", exc)
            return
        self.metrics.rows_published.inc(sent)

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        try:
            self.consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})
        except KafkaError as exc:  # the store holds the offsets; Kafka's copy catches up next batch
            log.warning("offset commit failed (%s); offsets are safe in the store", exc)

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(high - self.consumer.position(tp), 0))

    def _update_model_metrics(self) -> None:
        m, learner, g = self.metrics, self.learner, self.learner.graph
        cfg = learner.cfg
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


def install_signal_handlers(consumer: StreamConsumer) -> None:
    """SIGTERM/SIGINT finish the current micro-batch, store it, commit, then exit."""
    signal.signal(signal.SIGTERM, consumer.request_stop)
    signal.signal(signal.SIGINT, consumer.request_stop)


