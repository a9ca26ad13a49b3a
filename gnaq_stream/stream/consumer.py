"""`gnaq-stream consume`: the Kafka loop (poll, rebalance, seek, commit, retries, stop) around the
micro-batch pipeline (gnaq_stream.stream.pipeline).

Resume contract: the store is the source of truth for offsets. They are written in the same atomic
WriteBatch as the micro-batch they belong to and committed to Kafka only after that write (the
group's committed offsets are for monitoring only). On assignment a partition is positioned at the
offset stored with the data; a partition the store has never read starts at `--start-offset`
(default: the beginning), logged. Offsets that can no longer be read (deleted by retention, topic
re-created) are logged as errors and counted, never skipped silently.

One learner per model: every member of the group proposes the `SoleOwnerAssignor`, which gives all
partitions to the member that joined first. A learner owning only part of the topic applies nothing;
if it does not own everything within `--exclusive-wait-seconds` it stops with an error naming the
owner. A restarted learner therefore waits out its dead predecessor's session, then takes over.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, OffsetOutOfRangeError, TopicAlreadyExistsError
from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment, ConsumerProtocolSubscription
from kafka.structs import OffsetAndMetadata

from gnaq_stream.checkpoint import load_checkpoint
from gnaq_stream.config import ConsumerConfig, LearnerConfig
from gnaq_stream.errors import GnaqError
from gnaq_stream.kafka_codecs import DecompressionError, install_bounded_decoders
from gnaq_stream.metrics import LearnerMetrics
from gnaq_stream.store.embedding_store import EmbeddingStore
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.pipeline import MicroBatchPipeline
from gnaq_stream.stream.updates import UpdatesPublisher
from gnaq_stream.updates_format import META_KEY, decode_meta

log = logging.getLogger("gnaq_stream.consume")


class ConsumeError(GnaqError):
    """The learner cannot go on safely (another learner owns the topic, a topic is unusable)."""


class SoleOwnerAssignor(AbstractPartitionAssignor):
    """All partitions to the member that joined the group first, none to the others; every member
    learns who the owner is (its identity travels in the assignment's user data)."""

    name = "gnaq-sole-owner"
    version = 0

    def __init__(self, identity: dict):
        self.identity = {**identity, "since": time.time()}
        self.owner: dict = {}

    def metadata(self, topics):
        return ConsumerProtocolSubscription(self.version, list(topics), json.dumps(self.identity).encode())

    def assign(self, cluster, members):
        def since(member) -> tuple[float, str]:
            try:
                return float(json.loads(member.metadata.user_data)["since"]), member.member_id
            except (ValueError, KeyError, TypeError):  # a member without our metadata never owns
                return float("inf"), member.member_id
        owner = min(members, key=since)
        topics = sorted({t for m in members for t in m.metadata.topics})
        everything = [(t, sorted(cluster.partitions_for_topic(t) or ())) for t in topics]
        return {m.member_id: ConsumerProtocolAssignment(self.version, everything if m is owner else [],
                                                        owner.metadata.user_data)
                for m in members}

    def on_assignment(self, assignment, generation):
        try:
            self.owner = json.loads(assignment.user_data or b"{}")
        except ValueError:
            self.owner = {}


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: "StreamConsumer"):
        self.owner = owner

    def on_partitions_revoked(self, revoked) -> None:
        # records not yet stored are re-read by whoever owns the partition next
        revoked = set(revoked)
        self.owner.pending = [r for r in self.owner.pending if TopicPartition(r.topic, r.partition) not in revoked]

    def on_partitions_assigned(self, assigned) -> None:
        try:
            self.owner.on_assigned(list(assigned))
        except Exception as exc:  # noqa: BLE001 - kafka-python would wrap it in an opaque KafkaError
            self.owner.failure = exc


def _retry(what: str, action: Callable, should_stop: Callable[[], bool], max_backoff: float = 10.0):
    """Run `action` until it succeeds, backing off exponentially while Kafka is unreachable; a
    non-retriable KafkaError, or any while stopping, is raised."""
    backoff = 0.5
    while True:
        try:
            return action()
        except KafkaError as exc:
            if should_stop() or exc.retriable is False:
                raise
            log.warning("%s failed (%r); retrying in %.1fs", what, exc, backoff)
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not should_stop():  # a stop request is not kept waiting
                time.sleep(0.1)
            backoff = min(backoff * 2, max_backoff)


class StreamConsumer:
    def __init__(self, ccfg: ConsumerConfig, lcfg: LearnerConfig, metrics: LearnerMetrics | None = None):
        self.ccfg = ccfg
        self.dlq_topic = ccfg.dlq_topic or f"{ccfg.topic}-dlq"
        self.stop_requested = False
        self.pending: list = []
        self.consumed = 0
        self.last_activity = time.monotonic()
        self.owns_all = False
        self.waiting_since: float | None = None  # since when an assignment leaves part of the topic to others
        self.unverified: set[TopicPartition] = set()  # positions not yet checked against the log's end
        self.failure: Exception | None = None  # raised in the rebalance listener, re-raised by the loop
        store = EmbeddingStore(ccfg.store)
        if store.is_empty():
            model = load_checkpoint(ccfg.checkpoint) if ccfg.checkpoint else None
            learner = StreamLearner.from_checkpoint(model, lcfg) if model else StreamLearner(lcfg)
            store.write(learner.initial_changes())
        else:
            if ccfg.checkpoint:
                log.info("store %s already holds a model; resuming from it, not from %s", ccfg.store, ccfg.checkpoint)
            learner = StreamLearner.from_state(store.load(lcfg))
        # the loaded model (hundreds of thousands of lists and strings) lives as long as the process;
        # kafka-python's allocations trigger full collections that rescanned it every time: 0.89 s vs
        # 0.07 s of GC per 160k events (benchmarks/stream_throughput.py --compare-gc-freeze)
        gc.freeze()
        self.pipeline = MicroBatchPipeline(learner, store, metrics, ccfg.max_message_bytes, ccfg.max_nodes,
                                           ccfg.snapshot_min_events)
        self.metrics = self.pipeline.metrics
        self.assignor = SoleOwnerAssignor({"model_id": learner.model_id, "host": socket.gethostname(),
                                           "pid": os.getpid(), "store": str(ccfg.store)})
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        self.stop_requested = True

    def _stopping(self) -> bool:
        return self.stop_requested

    def _connect(self) -> None:
        c = self.ccfg
        # a compression bomb becomes a dead letter, not an out-of-memory kill
        install_bounded_decoders(c.max_batch_inflated_bytes)
        common = dict(bootstrap_servers=c.bootstrap_servers.split(","), reconnect_backoff_max_ms=5000,
                      bootstrap_timeout_ms=5000)
        self.consumer = _retry("connecting consumer", lambda: KafkaConsumer(
            group_id=c.group, enable_auto_commit=False, auto_offset_reset="none", isolation_level="read_committed",
            partition_assignment_strategy=[self.assignor], metadata_max_age_ms=c.metadata_max_age_ms,
            max_poll_records=c.micro_batch_size, fetch_max_bytes=c.fetch_max_bytes,
            max_partition_fetch_bytes=min(c.fetch_max_bytes, 1024 * 1024),
            session_timeout_ms=c.session_timeout_ms, heartbeat_interval_ms=c.heartbeat_interval_ms,
            max_poll_interval_ms=300000, **common), self._stopping)
        self.producer = _retry("connecting producer", lambda: KafkaProducer(
            acks="all", linger_ms=5, batch_size=256 * 1024, max_block_ms=5000, **common), self._stopping)
        _retry("checking topics", lambda: self._ensure_topics(common), self._stopping)
        updates = None
        if c.updates_topic:
            learner = self.pipeline.learner
            stale = _retry("reading the updates topic", lambda: self._stale_update_keys(common), self._stopping)
            updates = UpdatesPublisher(self.producer, c.updates_topic, learner.cfg.serve_bits or learner.cfg.bits,
                                       stale)
        self.pipeline.connect(self.producer, self.dlq_topic, updates)
        self.consumer.subscribe([c.topic], listener=_Rebalance(self))
        # a (re)started learner publishes its whole state: the topic may miss what a crash cut off
        self._publish(refresh=True, everyone=True)

    def _ensure_topics(self, common: dict) -> None:
        """The dead-letter topic must exist (created if the cluster lets us) and the updates topic must
        have exactly one partition (created compacted if missing): refused at start, not at the first
        bad message."""
        wanted = {self.dlq_topic: {}}
        if self.ccfg.updates_topic:
            wanted[self.ccfg.updates_topic] = {"cleanup.policy": "compact"}
        existing = self.consumer.topics()
        missing = [t for t in wanted if t not in existing]
        if missing:
            admin = KafkaAdminClient(**common)
            try:
                admin.create_topics([NewTopic(t, 1, self.ccfg.replication_factor, topic_configs=wanted[t])
                                     for t in missing])
                log.info("created topics %s", missing)
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:
                if exc.retriable is not False:
                    raise
                raise ConsumeError(f"topics {missing} do not exist and could not be created ({exc!r}); "
                                   "create them (the updates topic with one partition)") from None
            finally:
                admin.close()
        if self.ccfg.updates_topic:
            parts = _retry("reading updates-topic metadata",
                           lambda: self._partitions(self.ccfg.updates_topic), self._stopping)
            if len(parts) != 1:
                raise ConsumeError(f"updates topic {self.ccfg.updates_topic!r} has {len(parts)} partitions; it must "
                                   "have exactly one (a model version is complete only in one partition's order)")

    def _partitions(self, topic: str) -> set[int]:
        parts = self.consumer.partitions_for_topic(topic)
        if not parts:
            self.consumer._client.cluster.request_update()  # noqa: SLF001 - no public refresh in kafka-python
            raise KafkaError(f"no metadata for topic {topic!r} yet")
        return parts

    def _stale_update_keys(self, common: dict) -> list[bytes]:
        """Keys another model left on the updates topic (deleted by tombstones before this model's
        first record), or none if the topic's last meta record is this model's or there is none."""
        reader = KafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **common)
        try:
            tp = TopicPartition(self.ccfg.updates_topic, 0)
            reader.assign([tp])
            reader.seek_to_beginning(tp)
            live: dict[bytes, bool] = {}
            model_id = None
            deadline = time.monotonic() + 5.0
            while True:
                batch = reader.poll(timeout_ms=500).get(tp, [])
                for rec in batch:
                    if rec.key is None:
                        continue
                    live[rec.key] = rec.value is not None
                    if rec.key == META_KEY and rec.value is not None:
                        try:
                            model_id = decode_meta(rec.value)["model_id"]
                        except ValueError:
                            pass
                high = reader.highwater(tp)
                if high is not None and reader.position(tp) >= high:
                    break
                if not batch and high is None and time.monotonic() > deadline:
                    break  # an empty topic answers no fetch with a high-water mark
        finally:
            reader.close()
        if model_id is None or model_id == self.pipeline.learner.model_id:
            return []
        stale = [k for k, alive in live.items() if alive and k != META_KEY]
        log.info("updates topic holds model %s: %d of its keys are deleted before model %s is published",
                 model_id, len(stale), self.pipeline.learner.model_id)
        return stale

    def run(self) -> int:
        """Consume until stopped (signal, --max-events or --idle-exit); returns events consumed.
        Raises ConsumeError (or StoreError) when it cannot go on safely."""
        try:
            self._connect()
        except KafkaError as exc:  # raised only once a stop was requested
            log.info("stopped while connecting (%r)", exc)
            self.close()
            return self.consumed
        except Exception:
            self.close()
            raise
        try:
            self._loop()
        except KafkaError as exc:  # not retriable (e.g. not authorised): a clear error, not a traceback
            raise ConsumeError(f"Kafka error the learner cannot recover from: {exc!r}") from None
        finally:
            self.close()
        return self.consumed

    def _loop(self) -> None:
        c, pipeline = self.ccfg, self.pipeline
        first_pending = self.last_activity = time.monotonic()
        while not self.stop_requested:
            room = c.micro_batch_size - len(self.pending)
            if c.max_events:
                room = min(room, c.max_events - self.consumed - len(self.pending))
            polled = self._poll(room)
            if self.failure is not None:
                raise self.failure if isinstance(self.failure, GnaqError) else ConsumeError(
                    f"partition assignment failed: {self.failure!r}")
            now = time.monotonic()
            self._check_ownership(now)
            for records in polled.values():
                if not self.pending:
                    first_pending = now
                self.pending.extend(records)
                self.last_activity = now
            self._observe_positions()
            idle = not polled and not self.pending and self.owns_all
            if idle and pipeline.can_consolidate(now - self.last_activity):
                pipeline.consolidate()
            elif idle and pipeline.publication_behind:
                self._publish(refresh=True)  # idle: let the replicas catch up fully
            full = len(self.pending) >= c.micro_batch_size or (c.max_events and room <= 0)
            if self.pending and (full or now - first_pending >= c.max_wait_seconds):
                stored, self.pending = self._process(self.pending), []
                if not stored:
                    break  # stopping with the batch unstored: it is read again on restart
            if c.max_events and self.consumed >= c.max_events:
                break
            if c.idle_exit and self.owns_all and not self.pending and now - self.last_activity >= c.idle_exit:
                log.info("no messages for %.1fs; exiting", c.idle_exit)
                break
        if self.pending:  # a stop finishes the current micro-batch when it can
            self._process(self.pending)
            self.pending = []
        self._publish(refresh=True)  # if it fails, the next start republishes everything

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None
        if self.producer is not None:
            self.producer.close(timeout=5)
            self.producer = None
        self.pipeline.close()
        self.pipeline.store.close()

    # ---- assignment and positions ---------------------------------------------------------------

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Position every partition at the offset stored with the data, or at `--start-offset` where
        the store has none; apply nothing unless this learner owns the whole topic."""
        c, consumer = self.ccfg, self.consumer
        every = {TopicPartition(c.topic, p) for p in (consumer.partitions_for_topic(c.topic) or ())}
        self.owns_all = bool(assigned) and set(assigned) >= every
        self.metrics.owns_all_partitions.set(int(self.owns_all))
        if not self.owns_all:
            consumer.pause(*assigned)
            if self.waiting_since is None:
                self.waiting_since = time.monotonic()
            log.warning("waiting for exclusive ownership of %r: owned by %s", c.topic, self._owner_text())
            return
        consumer.resume(*assigned)
        self.waiting_since = None
        stored = self._stored_offsets(c.topic, assigned)
        for tp in sorted(assigned):
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                consumer.seek(tp, offset)
                self.unverified.add(tp)
                continue
            (consumer.seek_to_beginning if c.start_offset == "earliest" else consumer.seek_to_end)(tp)
            log.info("partition %d: no offset in the store; starting from the %s (--start-offset %s)",
                     tp.partition, "beginning" if c.start_offset == "earliest" else "end", c.start_offset)
        self.last_activity = time.monotonic()  # the idle clock starts once there is something to read
        log.info("assigned %s", sorted((tp.partition, stored.get((tp.topic, tp.partition))) for tp in assigned))

    def _stored_offsets(self, topic: str, assigned: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """The store's offsets, unless they belong to a topic of the same name that has since been
        deleted and re-created (another topic id): then its partitions restart at their beginning,
        stored together with the new id."""
        store = self.pipeline.store
        # kafka-python exposes topic ids only on its cluster metadata (None from brokers before 2.8)
        current, before = self.consumer._client.cluster.topic_id(topic), store.topic_id(topic)  # noqa: SLF001
        if current is not None and before is not None and str(current) != before:
            log.error("topic %r was deleted and re-created since its offsets were stored (id %s, now %s): its "
                      "offsets no longer apply; reading it from the beginning", topic, before, current)
            # offset 0, not the log start: a listener must not block on the broker (kafka-python's IO
            # thread); a log that no longer starts at 0 is then reported as out of range, and read on
            self.pipeline.store_positions({(tp.topic, tp.partition): 0 for tp in assigned}, {topic: str(current)})
        elif current is not None and before is None:
            self.pipeline.store_positions({}, {topic: str(current)})
        return store.offsets()

    def _owner_text(self) -> str:
        o = self.assignor.owner
        if not o:
            return "another member of the group"
        return (f"learner of model {o.get('model_id')} on {o.get('host')} (pid {o.get('pid')}, store "
                f"{o.get('store')}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(o.get('since', 0)))})")

    def _check_ownership(self, now: float) -> None:
        if self.owns_all or self.waiting_since is None:
            return
        if now - self.waiting_since > self.ccfg.exclusive_wait_seconds:
            raise ConsumeError(f"topic {self.ccfg.topic!r} in group {self.ccfg.group!r} is owned by "
                               f"{self._owner_text()}: one learner per model; stop the other learner or use "
                               f"another --group (waited {self.ccfg.exclusive_wait_seconds:.0f}s)")

    def _poll(self, room: int) -> dict:
        if room <= 0:
            return {}
        try:
            return self.consumer.poll(timeout_ms=100, max_records=room)
        except DecompressionError as exc:
            self._skip_undecodable(exc)
            return {}
        except OffsetOutOfRangeError as exc:
            for tp, offset in exc.args[0].items():
                start = self.consumer.beginning_offsets([tp])[tp]
                self._unreadable(tp, offset, start, f"offset {offset} is out of range (log starts at {start}): "
                                                    "records were deleted before they were read, or the topic "
                                                    "was re-created")
            return {}

    def _observe_positions(self) -> None:
        """Export lag, and check each stored position against the log's end once it is known: a
        position past the end means the topic was re-created (or truncated) since it was stored."""
        consumer = self.consumer
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            position = consumer.position(tp)
            if tp in self.unverified:
                self.unverified.discard(tp)
                if position > high:
                    self._unreadable(tp, position, 0, f"stored offset {position} is past the end of the log "
                                                      f"({high}): the topic was re-created or truncated")
                    continue
            self.metrics.consumer_lag.labels(str(tp.partition)).set(max(high - position, 0))

    def _unreadable(self, tp: TopicPartition, offset: int, restart_at: int, why: str) -> None:
        skipped = max(restart_at - offset, 0)
        log.error("partition %d: %s; reading on from offset %d (%d offsets never read)", tp.partition, why,
                  restart_at, skipped)
        self.metrics.events_skipped.labels(str(tp.partition)).inc(skipped)
        self.consumer.seek(tp, restart_at)

    def _skip_undecodable(self, exc: DecompressionError) -> None:
        """A batch that cannot be decompressed: what was read before it is processed first, then the
        batch goes to the dead-letter topic as an offset range and its partition reads on after it."""
        tp = exc.topic_partition
        if tp is None or exc.base_offset is None or exc.next_offset is None:
            raise ConsumeError(f"a record batch cannot be decoded and its offsets are unknown ({exc}); "
                               "it is in an old message format: remove it from the topic") from None
        if self.pending:
            stored, self.pending = self._process(self.pending), []
            if not stored:
                return
        log.error("partition %d: record batch at offsets %d-%d cannot be decoded (%s); sent to %s as one "
                  "dead letter", tp.partition, exc.base_offset, exc.next_offset - 1, exc, self.dlq_topic)
        try:
            offsets = _retry("dead-lettering an undecodable batch",
                             lambda: self.pipeline.skip(tp.topic, tp.partition, exc.base_offset, exc.next_offset,
                                                        str(exc)), self._stopping)
        except KafkaError as err:
            if self.stop_requested:
                return
            raise ConsumeError(f"dead-letter topic {self.dlq_topic!r} refuses records ({err!r})") from None
        self.consumer.seek(tp, exc.next_offset)
        self._commit(offsets)

    # ---- one micro-batch ------------------------------------------------------------------------

    def _process(self, records: list) -> bool:
        """Process, store and commit; False if a stop request came while the batch could not be
        processed (nothing of it applied or stored)."""
        try:
            offsets = _retry("processing a micro-batch", lambda: self.pipeline.process(records), self._stopping)
        except KafkaError as exc:
            if self.stop_requested:
                log.warning("stopping with %d records not applied (%r); they are read again on restart",
                            len(records), exc)
                return False
            raise ConsumeError(f"dead-letter topic {self.dlq_topic!r} refuses records ({exc!r}); nothing of "
                               "the batch was applied: fix the topic and restart") from None
        self.consumed += len(records)
        self._publish()
        self._commit(offsets)
        return True

    def _publish(self, refresh: bool = False, everyone: bool = False) -> None:
        """A failed publication is left to the next one (the pipeline repeats it in full)."""
        try:
            self.pipeline.publish(refresh, everyone)
        except KafkaError as exc:
            log.warning("embedding updates not published (%r); repeated with the next publication", exc)

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        try:
            # bounded: a commit is only a monitoring copy, and a stop request must not wait on it
            self.consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()},
                                 timeout_ms=5000)
        except KafkaError as exc:  # the store holds the offsets; Kafka's copy catches up next batch
            log.warning("offset commit failed (%r); offsets are safe in the store", exc)


def install_signal_handlers(consumer: StreamConsumer) -> None:
    """SIGTERM/SIGINT finish the current micro-batch, store it, commit, then exit."""
    signal.signal(signal.SIGTERM, consumer.request_stop)
    signal.signal(signal.SIGINT, consumer.request_stop)
