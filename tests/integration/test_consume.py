"""`gnaq-stream consume` against a real broker, real RocksDB and a real Prometheus server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gnaq_stream.config import ConsumerConfig, LearnerConfig
from gnaq_stream.data.events import DEAD_LETTER_REASONS, REJECTION_REASONS
from gnaq_stream.store.embedding_store import EmbeddingStore, inspect_store
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.consumer import StreamConsumer

from .conftest import GROUP_CONSUMER_KWARGS, consume_all, create_topic, free_port, produce, wait_until

SMALL_MODEL = ["--dim", "16", "--refine-steps", "1", "--prequential-sample", "0.5"]


def ml100k_events(data_dir: Path, n: int) -> list[tuple[int, int, int]]:
    raw = np.loadtxt(data_dir / "ml-100k" / "u.data", dtype=np.int64)
    raw = raw[np.argsort(raw[:, 3], kind="stable")][:n]
    return [(u, i, t) for u, i, _, t in raw.tolist()]


def encode(events) -> list[bytes]:
    return [json.dumps({"user": u, "item": i, "ts": t}).encode() for u, i, t in events]


def consume_cmd(bootstrap: str, topic: str, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gnaq_stream.cli", "consume", "--bootstrap-servers", bootstrap, "--topic", topic,
            "--group", f"g-{topic}", "--store", str(store), "--session-timeout-ms",
            str(GROUP_CONSUMER_KWARGS["session_timeout_ms"]), "--heartbeat-interval-ms",
            str(GROUP_CONSUMER_KWARGS["heartbeat_interval_ms"]), *SMALL_MODEL, *extra]


def stored_edge_events(store: Path) -> dict[tuple[str, str], int]:
    with EmbeddingStore(store, read_only=True) as s:
        learner = StreamLearner.from_state(s.load(LearnerConfig()))
    return learner.graph.event_counts()


def events_in_store(store: Path) -> int:
    try:
        return inspect_store(store)["events"]
    except Exception:  # noqa: BLE001 - not created yet
        return -1


def test_consumes_ml100k_in_time_order(kafka_broker, data_dir, tmp_path):
    events = ml100k_events(data_dir, 3000)
    create_topic(kafka_broker.bootstrap, "ml", partitions=2)
    produce(kafka_broker.bootstrap, "ml", encode(events))
    store = tmp_path / "store"
    proc = subprocess.run(consume_cmd(kafka_broker.bootstrap, "ml", store, "--max-events", "3000",
                                      "--micro-batch-size", "500"), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = inspect_store(store)
    expected = Counter((str(u), str(i)) for u, i, _ in events)
    assert info["events"] == 3000
    assert info["edges"] == len(expected)
    assert info["users"] == len({u for u, _, _ in events}) and info["items"] == len({i for _, i, _ in events})
    assert sum(info["offsets"].values()) == 3000
    assert info["compression"] == pytest.approx(64 / (16 * 2 / 8 + 4))  # dim 16, 2 bits, fp8 levels
    assert stored_edge_events(store) == dict(expected)


def test_consolidates_only_once_the_stream_is_quiet(kafka_broker, data_dir, tmp_path):
    events = ml100k_events(data_dir, 2000)
    create_topic(kafka_broker.bootstrap, "quiet", partitions=1)
    produce(kafka_broker.bootstrap, "quiet", encode(events))
    runs = {}
    for name, after_idle, idle_exit in (("quiet", "1", "10"), ("never-quiet-enough", "60", "10")):
        store = tmp_path / name
        cmd = consume_cmd(kafka_broker.bootstrap, "quiet", store, "--micro-batch-size", "500", "--idle-exit", idle_exit,
                          "--consolidate-after-idle-seconds", after_idle)
        cmd[cmd.index("--group") + 1] = f"g-{name}"
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = (proc.stderr, inspect_store(store))
    stderr, info = runs["quiet"]
    assert "consolidated:" in stderr and info["events"] == 2000 and sum(info["offsets"].values()) == 2000
    stderr, info = runs["never-quiet-enough"]  # idle for 10 s, consolidation would start after 60
    assert "consolidated:" not in stderr and info["events"] == 2000, stderr


def test_kill9_mid_stream_then_restart_applies_every_event_once(kafka_broker, data_dir, tmp_path):
    # far more events than the last kill point: a kill that lands a second late is still mid-stream
    events = ml100k_events(data_dir, 12000)
    create_topic(kafka_broker.bootstrap, "crash", partitions=2)
    produce(kafka_broker.bootstrap, "crash", encode(events))
    store = tmp_path / "store"
    cmd = consume_cmd(kafka_broker.bootstrap, "crash", store, "--micro-batch-size", "100", "--max-wait-seconds", "0.2")
    seen_progress = []
    for stop_after in (300, 1500, 2600):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: events_in_store(store) >= stop_after, 120, f"{stop_after} events stored")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        seen_progress.append(events_in_store(store))
    # longer than the session timeout: the killed members must be evicted before partitions are all ours
    proc = subprocess.run(cmd + ["--idle-exit", "12"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seen_progress == sorted(seen_progress) and seen_progress[-1] < len(events)
    info = inspect_store(store)
    assert info["events"] == len(events)
    assert sum(info["offsets"].values()) == len(events)
    assert stored_edge_events(store) == dict(Counter((str(u), str(i)) for u, i, _ in events))


def test_recovers_when_the_broker_goes_down_and_comes_back(persistent_broker, data_dir, tmp_path):
    events = ml100k_events(data_dir, 2000)
    create_topic(persistent_broker.bootstrap, "outage", partitions=1)
    produce(persistent_broker.bootstrap, "outage", encode(events[:1000]))
    store = tmp_path / "store"
    proc = subprocess.Popen(consume_cmd(persistent_broker.bootstrap, "outage", store, "--micro-batch-size", "200"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: events_in_store(store) == 1000, 120, "first 1000 events stored")
        persistent_broker.stop()
        time.sleep(5)
        assert proc.poll() is None, "consumer died while the broker was down"
        persistent_broker.start()
        produce(persistent_broker.bootstrap, "outage", encode(events[1000:]))
        wait_until(lambda: events_in_store(store) == 2000, 120, "all 2000 events stored after the outage")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert inspect_store(store)["events"] == 2000


BAD_MESSAGES = {
    "too_large": b'{"user": 1, "item": 2, "ts": 3, "pad": "' + b"x" * 300 + b'"}',
    "invalid_json": b"{not json",
    "not_an_object": b"[1, 2, 3]",
    "missing_field": b'{"user": 1, "ts": 3}',
    "wrong_type": b'{"user": 1, "item": 2, "ts": "yesterday"}',
    "bad_timestamp": b'{"user": 1, "item": 2, "ts": -5}',
    "bad_weight": b'{"user": 1, "item": 2, "ts": 3, "weight": -1}',
}


def test_malformed_messages_go_to_the_dead_letter_topic(kafka_broker, data_dir, tmp_path):
    assert set(BAD_MESSAGES) == set(REJECTION_REASONS)
    good = encode(ml100k_events(data_dir, 500))
    stream = good[:200] + list(BAD_MESSAGES.values()) + good[200:] + [BAD_MESSAGES["invalid_json"]]
    create_topic(kafka_broker.bootstrap, "mixed", partitions=1)
    produce(kafka_broker.bootstrap, "mixed", stream)
    consumer = StreamConsumer(
        ConsumerConfig(bootstrap_servers=kafka_broker.bootstrap, topic="mixed", group="g-mixed",
                       store=str(tmp_path / "store"), dlq_topic="mixed-dlq", max_message_bytes=256,
                       max_events=len(stream), micro_batch_size=100, **GROUP_CONSUMER_KWARGS),
        LearnerConfig(dim=16, refine_steps=1))
    assert consumer.run() == len(stream)
    registry = consumer.metrics.registry
    assert registry.get_sample_value("gnaq_events_applied_total") == 500
    assert registry.get_sample_value("gnaq_events_consumed_total") == len(stream)
    for reason in DEAD_LETTER_REASONS:
        expected = 2 if reason == "invalid_json" else int(reason in REJECTION_REASONS)
        assert registry.get_sample_value("gnaq_events_rejected_total", {"reason": reason}) == expected
    assert inspect_store(tmp_path / "store")["events"] == 500
    dead = consume_all(kafka_broker.bootstrap, "mixed-dlq", expected=len(BAD_MESSAGES) + 1)
    assert len(dead) == len(BAD_MESSAGES) + 1
    by_reason = Counter()
    for rec in dead:
        headers = dict(rec.headers)
        reason = headers["reason"].decode()
        by_reason[reason] += 1
        assert rec.value == BAD_MESSAGES[reason]  # the original bytes, untouched
        assert headers["detail"] and headers["source"].startswith(b"mixed:0:")
    assert by_reason == {r: (2 if r == "invalid_json" else 1) for r in REJECTION_REASONS}


@pytest.mark.parametrize("client", ["aiokafka", "confluent"])
def test_events_from_other_client_libraries(kafka_broker, data_dir, tmp_path, client):
    events = ml100k_events(data_dir, 300)
    create_topic(kafka_broker.bootstrap, f"from-{client}", partitions=1)
    produce(kafka_broker.bootstrap, f"from-{client}", encode(events), client=client)
    store = tmp_path / "store"
    proc = subprocess.run(consume_cmd(kafka_broker.bootstrap, f"from-{client}", store, "--max-events", "300"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert inspect_store(store)["events"] == 300


LEARNER_METRICS = ["gnaq_events_consumed_total", "gnaq_events_applied_total", "gnaq_events_rejected_total",
                   "gnaq_micro_batch_seconds_bucket", "gnaq_refine_seconds_count", "gnaq_freshness_seconds_bucket",
                   "gnaq_consumer_lag_messages", "gnaq_nodes", "gnaq_edges", "gnaq_model_bytes",
                   "gnaq_model_fp32_bytes", "gnaq_compression_ratio", "gnaq_stream_recall_at_k",
                   "gnaq_stream_ndcg_at_k", "gnaq_model_version"]


def test_metrics_are_served_and_scraped_by_prometheus(kafka_broker, start_prometheus, data_dir, tmp_path):
    events = ml100k_events(data_dir, 2000)
    create_topic(kafka_broker.bootstrap, "metered", partitions=1)
    produce(kafka_broker.bootstrap, "metered", encode(events))
    port = free_port()
    proc = subprocess.Popen(consume_cmd(kafka_broker.bootstrap, "metered", tmp_path / "store", "--metrics-port",
                                        str(port), "--micro-batch-size", "250"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: events_in_store(tmp_path / "store") == 2000, 120, "all events stored")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for name in LEARNER_METRICS:
            assert f"\n{name}" in text, f"{name} not exported"
        prom = start_prometheus([f"127.0.0.1:{port}"])
        result = prom.wait_for("gnaq_events_applied_total >= 2000", timeout=30)
        assert float(result[0]["value"][1]) == 2000
        recall = prom.wait_for('gnaq_stream_recall_at_k{k="20"}', timeout=30)
        assert 0.0 <= float(recall[0]["value"][1]) <= 1.0
        assert float(prom.wait_for("gnaq_compression_ratio")[0]["value"][1]) == pytest.approx(8.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]


def test_starts_while_the_broker_is_unreachable_and_connects_when_it_appears(kafka_broker, data_dir, tmp_path):
    kafka_broker.stop()
    store = tmp_path / "store"
    proc = subprocess.Popen(consume_cmd(kafka_broker.bootstrap, "late", store), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        time.sleep(6)
        assert proc.poll() is None, "consumer gave up while the broker was unreachable"
        kafka_broker.start()
        create_topic(kafka_broker.bootstrap, "late", partitions=1)
        produce(kafka_broker.bootstrap, "late", encode(ml100k_events(data_dir, 200)))
        wait_until(lambda: events_in_store(store) == 200, 120, "events stored once the broker is up")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"retrying in" in err
