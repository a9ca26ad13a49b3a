"""The micro-batch pipeline driven directly (no broker): dead letters, limits, failures that must
leave model, store and offsets untouched, and the sole-owner group assignment."""

import json
import time
from types import SimpleNamespace

import pytest
from doubles import RecordingProducer
from kafka.errors import KafkaTimeoutError

from gnaq_stream.config import LearnerConfig
from gnaq_stream.store.embedding_store import EmbeddingStore, StoreError
from gnaq_stream.stream.consumer import SoleOwnerAssignor
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.pipeline import DLQ_MAX_VALUE_BYTES, MicroBatchPipeline
from gnaq_stream.stream.updates import UpdatesPublisher

CFG = LearnerConfig(dim=8, bits=2, refine_steps=1, prequential_sample=0.0)


def record(offset, value, key=None, partition=0):
    return SimpleNamespace(topic="t", partition=partition, offset=offset, timestamp=0, key=key, value=value)


def event(user, item, ts=1):
    return json.dumps({"user": user, "item": item, "ts": ts}).encode()


@pytest.fixture
def pipeline(tmp_path):
    store = EmbeddingStore(tmp_path / "store")
    learner = StreamLearner(CFG)
    store.write(learner.initial_changes())
    pipe = MicroBatchPipeline(learner, store, max_message_bytes=256, max_nodes=3)
    producer = RecordingProducer()
    pipe.connect(producer, "t-dlq")
    yield pipe, producer, store
    store.close()


def applied(pipe):
    return pipe.metrics.registry.get_sample_value("gnaq_events_applied_total")


def test_events_past_the_node_limit_go_to_the_dead_letter_topic(pipeline):
    pipe, producer, store = pipeline
    offsets = pipe.process([record(k, event(f"u{k}", "i0")) for k in range(5)])
    assert offsets == {("t", 0): 5} and store.offsets() == {("t", 0): 5}
    assert pipe.learner.graph.n_users == 3 and applied(pipe) == 3
    assert [h["reason"] for _, _, _, h in producer.sent] == [b"node_limit", b"node_limit"]
    # known users keep learning at the limit
    pipe.process([record(5, event("u0", "i1"))])
    assert applied(pipe) == 4 and pipe.learner.graph.n_events == 4


def test_a_huge_key_is_too_large_and_an_oversized_copy_is_cut_to_fit(pipeline):
    pipe, producer, _ = pipeline
    huge_value = b"x" * (DLQ_MAX_VALUE_BYTES + 10)
    pipe.process([record(0, event("u0", "i0"), key=b"k" * 5000), record(1, huge_value), record(2, event("u1", "i0"))])
    (_, key0, _, h0), (_, _, value1, h1) = producer.sent
    assert h0["reason"] == b"too_large" and b"key of 5000 bytes" in h0["detail"]
    assert len(key0) == 1024 and h0["key_bytes"] == b"5000" and h0["truncated"] == b"true"
    assert h1["reason"] == b"too_large" and len(value1) == DLQ_MAX_VALUE_BYTES
    assert h1["value_bytes"] == str(len(huge_value)).encode() and h1["source"] == b"t:0:1"
    assert pipe.metrics.registry.get_sample_value("gnaq_dlq_truncated_total") == 2
    assert applied(pipe) == 1


def test_a_failed_dead_letter_send_applies_and_stores_nothing(pipeline):
    pipe, producer, store = pipeline
    pipe.process([record(0, event("u0", "i0"))])
    version, state = pipe.learner.version, store.state_meta()
    producer.failing = True
    batch = [record(1, event("u1", "i1")), record(2, b"{not json")]
    with pytest.raises(KafkaTimeoutError):
        pipe.process(batch)
    assert pipe.learner.version == version and store.state_meta() == state and store.offsets() == {("t", 0): 1}
    assert pipe.metrics.registry.get_sample_value("gnaq_publish_failures_total", {"topic": "dlq"}) == 1
    producer.failing = False  # the same records again, once the topic takes them: applied once
    assert pipe.process(batch) == {("t", 0): 3}
    assert pipe.learner.graph.n_events == 2 and store.state_meta()["n_events"] == 2


def test_a_failed_store_write_is_a_clear_error_and_stores_nothing(pipeline):
    pipe, _, store = pipeline

    class FullDisk:
        def write(self, batch):
            raise OSError("IO error: No space left on device")

        def get(self, key):
            return None

    real = store.db
    store.db = FullDisk()
    try:
        with pytest.raises(StoreError, match="No space left on device.*nothing of this batch was stored"):
            pipe.process([record(0, event("u0", "i0"))])
    finally:
        store.db = real
    assert store.offsets() == {} and store.state_meta()["n_events"] == 0


def _member(member_id, since):
    user_data = json.dumps({"since": since, "model_id": member_id}).encode() if since is not None else b""
    return SimpleNamespace(member_id=member_id, metadata=SimpleNamespace(topics=["t"], user_data=user_data))


def test_consolidation_is_earned_per_applied_event_capped_and_spent_to_zero(tmp_path, monkeypatch):
    cfg = LearnerConfig(dim=8, bits=2, refine_steps=0, prequential_sample=0.0, consolidate_pairs_per_event=3.0,
                        consolidate_max_epochs=2.0, consolidate_batch=64, consolidate_after_idle_seconds=0.0)
    store = EmbeddingStore(tmp_path / "store")
    learner = StreamLearner(cfg)
    store.write(learner.initial_changes())
    pipe = MicroBatchPipeline(learner, store)
    # work, not seconds: the same events earn the same budget however slow the batch was
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr("gnaq_stream.stream.pipeline.time.perf_counter", lambda: float(next(clock)))
    pipe.process([record(k, event(f"u{k % 20}", f"i{k % 7}")) for k in range(40)])  # 1 event per edge
    assert pipe.budget == 3.0 * 40 * 2 / 3  # capped at 2 epochs of the 40 edges, not 3 x 40 events
    monkeypatch.undo()
    assert pipe.can_consolidate(idle_seconds=0.0)
    pipe.consolidate()
    assert pipe.budget == 0.0 and not pipe.can_consolidate(idle_seconds=0.0)
    sample = pipe.metrics.registry.get_sample_value
    assert sample("gnaq_consolidated_pairs_total") == 80 and sample("gnaq_consolidate_budget_pairs") == 0
    store.close()


def test_the_sole_owner_assignor_gives_every_partition_to_the_first_member():
    cluster = SimpleNamespace(partitions_for_topic=lambda topic: {0, 1, 2})
    members = [_member("b", 20.0), _member("a", 10.0), _member("c", None)]  # c: not one of ours
    assignment = SoleOwnerAssignor({"model_id": "x"}).assign(cluster, members)
    assert [tp.partition for tp in assignment["a"].partitions()] == [0, 1, 2]
    assert assignment["b"].partitions() == [] and assignment["c"].partitions() == []
    follower = SoleOwnerAssignor({"model_id": "b"})
    follower.on_assignment(assignment["b"], 1)
    assert follower.owner["model_id"] == "a"


def test_offsets_deleted_before_they_were_read_are_an_error_and_a_count_not_a_silent_skip(tmp_path, caplog):
    # a real broker that deletes records (retention, DeleteRecords) is not available here (Tansu has
    # neither), so the Kafka consumer is a double raising what kafka-python raises for such an offset
    from kafka.errors import OffsetOutOfRangeError
    from kafka.structs import TopicPartition

    from gnaq_stream.config import ConsumerConfig
    from gnaq_stream.stream.consumer import StreamConsumer

    tp = TopicPartition("t", 0)

    class Consumer:
        seeks = []

        def poll(self, timeout_ms, max_records):
            raise OffsetOutOfRangeError({tp: 40})

        def beginning_offsets(self, partitions):
            return {tp: 100}

        def seek(self, partition, offset):
            self.seeks.append((partition, offset))

    consumer = StreamConsumer(ConsumerConfig(store=str(tmp_path / "store")), CFG)
    consumer.consumer = Consumer()
    try:
        assert consumer._poll(10) == {}
    finally:
        consumer.pipeline.store.close()
    assert Consumer.seeks == [(tp, 100)]
    assert consumer.metrics.registry.get_sample_value("gnaq_events_skipped_total", {"partition": "0"}) == 60
    assert "offset 40 is out of range (log starts at 100)" in caplog.text and "60 offsets never read" in caplog.text


class SlowProducer(RecordingProducer):
    """Every send takes `seconds` (the wall time a large publication costs)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def send(self, topic, key=None, value=None, headers=None):
        time.sleep(self.seconds)
        return super().send(topic, key, value, headers)


def test_the_refresh_period_backs_off_from_the_time_its_publication_takes(tmp_path):
    cfg = LearnerConfig(dim=8, bits=2, refine_steps=0, prequential_sample=0.0, refresh_seconds=0.0,
                        refresh_max_share=0.5)
    store = EmbeddingStore(tmp_path / "store")
    learner = StreamLearner(cfg)
    store.write(learner.initial_changes())
    pipe = MicroBatchPipeline(learner, store)
    producer = SlowProducer(0.0)
    pipe.connect(producer, "t-dlq", UpdatesPublisher(producer, "updates", 2))
    pipe.process([record(k, event(f"u{k}", f"i{k % 3}")) for k in range(6)])
    producer.seconds = 0.05  # 17 records (rows, histories, meta): the publication takes > 0.8 s
    pipe.publish()
    assert learner.refreshes == 1 and learner.publish_cost > 0.8
    producer.seconds = 0.0
    pipe.process([record(6, event("u0", "i1"))])
    pipe.publish()  # within (propagation + publication) / share (> 1.6 s) of the last propagation: none
    assert learner.refreshes == 1 and learner.publish_cost > 0.8  # a history alone is not a propagation's cost
    learner.refreshed_at -= 2 * (learner.refresh_cost + learner.publish_cost) + 0.1
    pipe.publish()  # past it
    assert learner.refreshes == 2 and learner.publish_cost < 0.5
    store.close()
