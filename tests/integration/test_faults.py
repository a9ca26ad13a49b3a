"""Fault scenarios of `gnaq-stream consume` against a real Kafka-protocol broker (Tansu) and a real store:
offsets owned by the store, empty stores, poison messages, a dead-letter topic that refuses records,
a second learner, partitions added, a topic re-created. See /work/shared/KAFKA.md for the broker."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter, namedtuple
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewPartitions
from kafka.errors import IncompatibleBrokerVersion, KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from gnaq_stream.config import ConsumerConfig, LearnerConfig
from gnaq_stream.store.embedding_store import EmbeddingStore, inspect_store
from gnaq_stream.stream.consumer import StreamConsumer, install_signal_handlers
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.pipeline import DLQ_MAX_KEY_BYTES, DLQ_MAX_VALUE_BYTES, MicroBatchPipeline

from .conftest import GROUP_CONSUMER_KWARGS, consume_all, create_topic, free_port, produce, wait_until
from .test_consume import consume_cmd, encode, events_in_store, ml100k_events, stored_edge_events

SMALL_LEARNER = LearnerConfig(dim=16, refine_steps=1, prequential_sample=0.5)


# --- helpers -------------------------------------------------------------------------------------

class Learner:
    """`gnaq-stream consume` as a child process whose stderr goes to a file (readable while it runs);
    always stopped on leaving the `with` block."""

    def __init__(self, cmd: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
                                     start_new_session=True)

    @property
    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 90.0) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and text not in self.stderr:
                raise AssertionError(f"learner exited with {self.proc.returncode}:\n{self.stderr[-3000:]}")
            return text in self.stderr
        wait_until(seen, timeout, f"{text!r} in the learner's stderr")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit within `timeout` (the test then fails)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"learner ignored SIGTERM for {timeout}s:\n{self.stderr[-3000:]}") from None

    def __enter__(self) -> "Learner":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def run_learner(cmd: list[str], timeout: float = 180.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def with_group(cmd: list[str], group: str) -> list[str]:
    cmd = list(cmd)
    cmd[cmd.index("--group") + 1] = group
    return cmd


def edge_counts(events) -> dict[tuple[str, str], int]:
    return dict(Counter((str(u), str(i)) for u, i, _ in events))


def produce_last_alone(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce `values` with the last record in a produce request of its own: Tansu under-reports a
    partition's end offset (ListOffsets latest) after a multi-record batch (KAFKA.md), which a
    `--start-offset latest` start relies on."""
    produce(bootstrap, topic, values[:-1])
    produce(bootstrap, topic, values[-1:])


class _Future:
    """What send_all reads of a kafka-python FutureRecordMetadata."""

    def __init__(self, exception: Exception | None = None):
        self.is_done = True
        self.exception = exception

    def failed(self) -> bool:
        return self.exception is not None

    def succeeded(self) -> bool:
        return self.exception is None


class ProducerDouble:
    """KafkaProducer's send/flush; every send acknowledged, or (fail=True) every send failed."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.sent: list[tuple] = []

    def send(self, topic, key=None, value=None, headers=None, **_kw) -> _Future:
        self.sent.append((topic, key, value, headers))
        return _Future(KafkaTimeoutError("dead-letter send failed (test double)") if self.fail else None)

    def flush(self, timeout=None) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


Rec = namedtuple("Rec", "topic partition offset timestamp key value")


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def dlq_failures(registry) -> float:
    return registry.get_sample_value("gnaq_publish_failures_total", {"topic": "dlq"})


# --- 1. offsets are the store's ------------------------------------------------------------------

def test_restart_resumes_from_the_store_offsets_not_the_rewound_group_offsets(kafka_broker, data_dir, tmp_path):
    bs, topic, n, m = kafka_broker.bootstrap, "rewind", 600, 300
    events = ml100k_events(data_dir, n + m)
    create_topic(bs, topic, partitions=2)
    produce(bs, topic, encode(events[:n]))
    store = tmp_path / "store"
    cmd = consume_cmd(bs, topic, store, "--micro-batch-size", "200")
    run_learner(cmd + ["--max-events", str(n)])
    stored = inspect_store(store)["offsets"]
    assert inspect_store(store)["events"] == n and sum(stored.values()) == n

    # the group's committed offsets are a monitoring copy: rewind them to 0
    tps = [TopicPartition(topic, p) for p in (0, 1)]
    rewinder = KafkaConsumer(bootstrap_servers=bs, group_id=f"g-{topic}", enable_auto_commit=False)
    try:
        rewinder.assign(tps)
        assert {tp.partition: rewinder.committed(tp) for tp in tps} == \
            {int(k.rsplit(":", 1)[1]): v for k, v in stored.items()}, "committed offsets should follow the store"
        rewinder.commit({tp: OffsetAndMetadata(0, "", -1) for tp in tps})
        assert [rewinder.committed(tp) for tp in tps] == [0, 0]
    finally:
        rewinder.close(autocommit=False)

    produce(bs, topic, encode(events[n:]))
    run_learner(cmd + ["--idle-exit", "5"])
    info = inspect_store(store)
    assert info["events"] == n + m
    assert sum(info["offsets"].values()) == n + m
    assert stored_edge_events(store) == edge_counts(events)  # nothing applied twice


# --- 2. an empty store under a group with committed offsets --------------------------------------

def test_an_empty_store_starts_at_start_offset_whatever_the_group_committed(kafka_broker, data_dir, tmp_path):
    bs, topic = kafka_broker.bootstrap, "fresh"
    events = ml100k_events(data_dir, 500)
    create_topic(bs, topic, partitions=1)
    produce_last_alone(bs, topic, encode(events[:400]))
    cmd = consume_cmd(bs, topic, tmp_path / "A", "--max-events", "400", "--micro-batch-size", "200")
    run_learner(cmd)  # group g-fresh has now committed offset 400
    assert inspect_store(tmp_path / "A")["events"] == 400

    proc = run_learner(consume_cmd(bs, topic, tmp_path / "B", "--max-events", "400", "--micro-batch-size", "200"))
    assert "no offset in the store; starting from the beginning" in proc.stderr, proc.stderr[-3000:]
    assert inspect_store(tmp_path / "B")["offsets"] == {f"{topic}:0": 400}
    assert stored_edge_events(tmp_path / "B") == edge_counts(events[:400])

    store_c, port = tmp_path / "C", free_port()
    with Learner(consume_cmd(bs, topic, store_c, "--start-offset", "latest", "--micro-batch-size", "50",
                             "--metrics-port", str(port)), tmp_path / "C.log") as c:
        c.wait_for_log("starting from the end (--start-offset latest)")
        c.wait_for_log("assigned [(0, None)]")
        # the lag is exported once a fetch answered from the resolved position: the seek to the end is done
        wait_until(lambda: 'gnaq_consumer_lag_messages{partition="0"} 0.0' in scrape(port), 60, "lag 0 exported")
        produce(bs, topic, encode(events[400:]))
        wait_until(lambda: events_in_store(store_c) >= 100, 90, "the later 100 events in store C")
        time.sleep(1)  # anything surplus would show up by now
        assert c.stop() == 0, c.stderr[-3000:]
    info = inspect_store(store_c)
    assert info["events"] == 100 and info["offsets"] == {f"{topic}:0": 500}
    assert stored_edge_events(store_c) == edge_counts(events[400:])


# --- 3. poison messages --------------------------------------------------------------------------

def test_oversized_value_and_key_go_to_the_dead_letter_topic_truncated(kafka_broker, data_dir, tmp_path):
    bs, topic = kafka_broker.bootstrap, "poison"
    events = ml100k_events(data_dir, 300)
    good = encode(events)
    big_value = b'{"user": 1, "item": 2, "ts": 3, "pad": "' + b"x" * 1_200_000 + b'"}'
    huge_key, keyed_value = b"k" * 100_000, b'{"user": "keyed-user", "item": "keyed-item", "ts": 5}'
    create_topic(bs, topic, partitions=1)
    producer = KafkaProducer(bootstrap_servers=bs, acks="all", max_request_size=5_000_000)
    try:  # Tansu accepts the 1.2 MB record (checked: up to 2 MB at least)
        futures = [producer.send(topic, value=v) for v in good[:100]]
        futures.append(producer.send(topic, value=big_value))
        futures += [producer.send(topic, value=v) for v in good[100:200]]
        futures.append(producer.send(topic, key=huge_key, value=keyed_value))
        futures += [producer.send(topic, value=v) for v in good[200:]]
        producer.flush(30)
        for f in futures:
            f.get(30)
    finally:
        producer.close(timeout=10)
    total = len(good) + 2
    consumer = StreamConsumer(
        ConsumerConfig(bootstrap_servers=bs, topic=topic, group="g-poison", store=str(tmp_path / "store"),
                       dlq_topic="poison-dlq", max_events=total, micro_batch_size=100, **GROUP_CONSUMER_KWARGS),
        SMALL_LEARNER)
    assert consumer.run() == total
    registry = consumer.metrics.registry
    assert registry.get_sample_value("gnaq_dlq_truncated_total") == 2
    assert registry.get_sample_value("gnaq_events_rejected_total", {"reason": "too_large"}) == 2
    assert registry.get_sample_value("gnaq_events_applied_total") == 300
    assert dlq_failures(registry) == 0
    info = inspect_store(tmp_path / "store")
    assert info["events"] == 300 and info["offsets"] == {f"{topic}:0": total}
    assert stored_edge_events(tmp_path / "store") == edge_counts(events)  # the keyed event is not applied

    dead = consume_all(bs, "poison-dlq", expected=2)
    assert len(dead) == 2
    by_source = {dict(r.headers)["source"].decode(): r for r in dead}
    assert set(by_source) == {f"{topic}:0:100", f"{topic}:0:201"}
    big = by_source[f"{topic}:0:100"]
    headers = dict(big.headers)
    assert headers["reason"] == b"too_large" and headers["truncated"] == b"true"
    assert headers["value_bytes"] == str(len(big_value)).encode() and headers["key_bytes"] == b"0"
    assert len(big.value) <= DLQ_MAX_VALUE_BYTES == 512 * 1024
    assert big.value == big_value[:DLQ_MAX_VALUE_BYTES] and big.key is None
    keyed = by_source[f"{topic}:0:201"]
    headers = dict(keyed.headers)
    assert headers["reason"] == b"too_large" and headers["truncated"] == b"true"
    assert headers["key_bytes"] == b"100000" and headers["value_bytes"] == str(len(keyed_value)).encode()
    assert keyed.key == huge_key[:DLQ_MAX_KEY_BYTES] and keyed.value == keyed_value


# --- 4. the dead-letter topic refuses records ----------------------------------------------------

def test_a_failed_dead_letter_send_applies_and_stores_nothing_of_the_batch(tmp_path):
    store = EmbeddingStore(tmp_path / "store")
    learner = StreamLearner(SMALL_LEARNER)
    store.write(learner.initial_changes())
    pipeline = MicroBatchPipeline(learner, store)
    ok = ProducerDouble()
    pipeline.connect(ok, "t-dlq")
    first = [Rec("t", 0, k, 1_000_000, None, v) for k, v in
             enumerate(encode((f"u{k % 7}", f"i{k % 11}", 100 + k) for k in range(100)))]
    assert pipeline.process(first) == {("t", 0): 100}
    events0, edges0 = store.state_meta()["n_events"], learner.graph.n_edges
    assert events0 == 100

    second_values = encode((f"v{k % 5}", f"j{k % 3}", 500 + k) for k in range(50)) + [b"{not json"]
    second = [Rec("t", 0, 100 + k, 1_000_000, None, v) for k, v in enumerate(second_values)]
    pipeline.connect(ProducerDouble(fail=True), "t-dlq")
    with pytest.raises(KafkaError):
        pipeline.process(second)
    assert store.offsets() == {("t", 0): 100}
    assert store.state_meta()["n_events"] == events0 and learner.graph.n_edges == edges0
    assert dlq_failures(pipeline.metrics.registry) == 1
    assert pipeline.metrics.registry.get_sample_value("gnaq_events_applied_total") == 100

    pipeline.connect(ok, "t-dlq")  # the same batch again, once the topic takes it: applied once
    assert pipeline.process(second) == {("t", 0): 151}
    assert store.offsets() == {("t", 0): 151} and store.state_meta()["n_events"] == 150
    assert [(t, v, dict(h)["reason"]) for t, _, v, h in ok.sent] == [("t-dlq", b"{not json", b"invalid_json")]
    store.close()
    expected = Counter((f"u{k % 7}", f"i{k % 11}") for k in range(100)) + \
        Counter((f"v{k % 5}", f"j{k % 3}") for k in range(50))
    assert stored_edge_events(tmp_path / "store") == dict(expected)


def test_sigterm_while_dead_letters_keep_failing_stops_promptly_with_the_batch_unstored(kafka_broker, data_dir,
                                                                                       tmp_path):
    """In-process (the failing producer is put in through the pipeline's public `connect`), with a
    real SIGTERM handled by install_signal_handlers; then a restart with a working dead-letter topic."""
    bs, topic, store = kafka_broker.bootstrap, "stuck", tmp_path / "store"
    events = ml100k_events(data_dir, 300)
    create_topic(bs, topic, partitions=1)
    produce(bs, topic, encode(events[:200]))

    def config(**kw) -> ConsumerConfig:
        return ConsumerConfig(bootstrap_servers=bs, topic=topic, group="g-stuck", store=str(store),
                              dlq_topic="stuck-dlq", micro_batch_size=100, **GROUP_CONSUMER_KWARGS, **kw)

    consumer = StreamConsumer(config(), SMALL_LEARNER)
    registry = consumer.metrics.registry
    errors: list[BaseException] = []
    killed_at: list[float] = []

    def orchestrate() -> None:
        try:
            wait_until(lambda: consumer.pipeline.producer is not None
                       and registry.get_sample_value("gnaq_events_applied_total") == 200, 120, "200 events applied")
            consumer.pipeline.connect(ProducerDouble(fail=True), consumer.dlq_topic, consumer.pipeline.updates)
            # the bad record first: whatever batch it lands in is the first batch after the swap
            produce(bs, topic, [b"{not json"] + encode(events[200:]))
            wait_until(lambda: dlq_failures(registry) >= 1, 60, "a failed dead-letter send")
            time.sleep(1)  # inside the retry back-off
            killed_at.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
            consumer.request_stop()

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    helper = threading.Thread(target=orchestrate, daemon=True)
    try:
        install_signal_handlers(consumer)
        helper.start()
        consumed = consumer.run()
        returned_at = time.monotonic()
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        helper.join(30)
    if errors:
        raise errors[0]
    assert returned_at - killed_at[0] < 10, f"stopped {returned_at - killed_at[0]:.1f}s after SIGTERM"
    assert consumed == 200
    assert dlq_failures(registry) >= 1
    assert registry.get_sample_value("gnaq_events_applied_total") == 200
    info = inspect_store(store)
    assert info["events"] == 200 and info["offsets"] == {f"{topic}:0": 200}

    # restarted with a dead-letter topic that works, the unstored batch is read again and applied once
    again = StreamConsumer(config(max_events=101), SMALL_LEARNER)
    assert again.run() == 101
    info = inspect_store(store)
    assert info["events"] == 300 and info["offsets"] == {f"{topic}:0": 301}
    assert stored_edge_events(store) == edge_counts(events)
    assert [r.value for r in consume_all(bs, "stuck-dlq", expected=1)] == [b"{not json"]


# --- 5. a second learner -------------------------------------------------------------------------

@pytest.mark.parametrize("partitions", [1, 2])
def test_a_second_learner_in_the_group_exits_while_the_first_keeps_applying(kafka_broker, data_dir, tmp_path,
                                                                             partitions):
    bs, topic = kafka_broker.bootstrap, f"solo{partitions}"
    events = ml100k_events(data_dir, 1200)
    values = encode(events)
    create_topic(bs, topic, partitions=partitions)
    produce(bs, topic, values[:100])
    sent = [100]
    stop_trickle = threading.Event()
    trickle_errors: list[BaseException] = []

    def trickle() -> None:  # ~20 events/s until told to stop
        producer = KafkaProducer(bootstrap_servers=bs, acks="all", linger_ms=0)
        try:
            futures = []
            while not stop_trickle.is_set() and sent[0] < len(values) - 100:
                futures.append(producer.send(topic, value=values[sent[0]]))
                sent[0] += 1
                time.sleep(0.05)
            producer.flush(30)
            for f in futures:
                f.get(30)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            trickle_errors.append(exc)
        finally:
            producer.close(timeout=10)

    store_a, store_b = tmp_path / "A", tmp_path / "B"
    producer_thread = threading.Thread(target=trickle, daemon=True)
    with Learner(consume_cmd(bs, topic, store_a, "--micro-batch-size", "50", "--max-wait-seconds", "0.2"),
                 tmp_path / "A.log") as a:
        try:
            wait_until(lambda: events_in_store(store_a) >= 100, 90, "learner A applying")
            producer_thread.start()
            with Learner(consume_cmd(bs, topic, store_b, "--exclusive-wait-seconds", "15"), tmp_path / "B.log") as b:
                applied_when_b_started = events_in_store(store_a)
                rc_b = b.wait(90)
                b_seconds = time.monotonic() - b.started
                applied_when_b_exited = events_in_store(store_a)
                assert rc_b == 2, b.stderr[-3000:]
                assert "one learner per model" in b.stderr, b.stderr[-3000:]
                assert "waiting for exclusive ownership" in b.stderr
                assert 15 <= b_seconds < 60, f"B exited after {b_seconds:.1f}s"
                assert events_in_store(store_b) == 0  # B applied nothing
            assert applied_when_b_exited > applied_when_b_started, "A stopped applying while B was there"
        finally:
            stop_trickle.set()
            if producer_thread.is_alive() or producer_thread.ident:
                producer_thread.join(60)
        if trickle_errors:
            raise trickle_errors[0]
        produce(bs, topic, values[sent[0]:])
        wait_until(lambda: events_in_store(store_a) == len(values), 120, "every event in A's store")
        time.sleep(1)  # anything applied twice would show up by now
        assert a.stop() == 0, a.stderr[-3000:]
    info = inspect_store(store_a)
    assert info["events"] == len(values) and sum(info["offsets"].values()) == len(values)
    assert len(info["offsets"]) == partitions
    assert stored_edge_events(store_a) == edge_counts(events)
    print(f"\nsecond learner ({partitions} partition(s)) exited with 2 after {b_seconds:.1f}s; "
          f"A applied {applied_when_b_exited - applied_when_b_started} events meanwhile")


# --- 6. partitions added while running -----------------------------------------------------------

def _skip_unless_create_partitions_works(bootstrap: str) -> None:
    create_topic(bootstrap, "grow-probe", partitions=1)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        admin.create_partitions({"grow-probe": NewPartitions(2)})
    except IncompatibleBrokerVersion as exc:
        pytest.skip(f"the broker (Tansu) does not implement the CreatePartitions API, so no partition can be "
                    f"added to a topic ({exc})")
    finally:
        admin.close()


def test_a_partition_added_while_running_is_read_from_its_beginning(kafka_broker, data_dir, tmp_path):
    bs, topic, store = kafka_broker.bootstrap, "grow", tmp_path / "store"
    _skip_unless_create_partitions_works(bs)
    events = ml100k_events(data_dir, 150)
    create_topic(bs, topic, partitions=1)
    produce(bs, topic, encode(events[:100]))
    with Learner(consume_cmd(bs, topic, store, "--metadata-max-age-ms", "1000", "--micro-batch-size", "50"),
                 tmp_path / "learner.log") as learner:
        wait_until(lambda: events_in_store(store) == 100, 90, "the first 100 events stored")
        admin = KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=10000)
        try:
            admin.create_partitions({topic: NewPartitions(2)})
        finally:
            admin.close()
        producer = KafkaProducer(bootstrap_servers=bs, acks="all", metadata_max_age_ms=1000)
        try:
            wait_until(lambda: 1 in (producer.partitions_for(topic) or ()), 30, "partition 1 in metadata")
            futures = [producer.send(topic, value=v, partition=1) for v in encode(events[100:])]
            producer.flush(30)
            for f in futures:
                f.get(30)
        finally:
            producer.close(timeout=10)
        wait_until(lambda: inspect_store(store)["offsets"].get(f"{topic}:1") == 50, 90, "partition 1 read")
        assert learner.stop() == 0, learner.stderr[-3000:]
    assert "partition 1: no offset in the store; starting from the beginning" in learner.stderr
    info = inspect_store(store)
    assert info["events"] == 150 and info["offsets"] == {f"{topic}:0": 100, f"{topic}:1": 50}
    assert stored_edge_events(store) == edge_counts(events)


# --- 7. the topic re-created ---------------------------------------------------------------------

def test_a_recreated_topic_is_read_from_its_new_beginning(kafka_broker, data_dir, tmp_path):
    bs, topic, store = kafka_broker.bootstrap, "again", tmp_path / "store"
    n, k = 300, 400
    events = ml100k_events(data_dir, n + k)
    create_topic(bs, topic, partitions=1)
    produce(bs, topic, encode(events[:n]))
    run_learner(consume_cmd(bs, topic, store, "--max-events", str(n), "--micro-batch-size", "100"))
    assert inspect_store(store)["offsets"] == {f"{topic}:0": n}

    admin = KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=10000)
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()
    wait_until(lambda: create_topic(bs, topic, partitions=1) is None, 30, "the topic re-created")
    produce(bs, topic, encode(events[n:]))
    assert len(consume_all(bs, topic, expected=k)) == k  # really a new log: offsets 0..k-1

    port = free_port()
    with Learner(consume_cmd(bs, topic, store, "--metrics-port", str(port), "--micro-batch-size", "50"),
                 tmp_path / "learner.log") as learner:
        wait_until(lambda: events_in_store(store) == n + k, 90, "the new events stored")
        metrics = scrape(port)
        assert learner.stop() == 0, learner.stderr[-3000:]
    err = learner.stderr
    # the new topic has another topic id: its log is read from the beginning even though it is longer
    # than the stored offset (a position past the end would be caught too, for brokers without ids)
    assert "ERROR" in err and "was deleted and re-created since its offsets were stored" in err, err[-3000:]
    assert "# TYPE gnaq_events_skipped_total counter" in metrics  # and no offset was skipped:
    assert 'gnaq_events_skipped_total{partition="0"}' not in metrics
    info = inspect_store(store)
    assert info["events"] == n + k and info["offsets"] == {f"{topic}:0": k}
    assert stored_edge_events(store) == edge_counts(events)
