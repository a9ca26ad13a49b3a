"""Recommender replicas (`gnaq-stream serve`: aiokafka + aiohttp) following a real learner through a real broker."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from doubles import RecordingProducer
from kafka import KafkaProducer

from gnaq_stream.config import LearnerConfig
from gnaq_stream.data.events import Event
from gnaq_stream.quant.packing import quantize_rows
from gnaq_stream.serve.scoring import ItemIndex
from gnaq_stream.store.embedding_store import EmbeddingStore, inspect_store
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.updates import UpdatesPublisher
from gnaq_stream.updates_format import META_KEY, row_record

from .conftest import GROUP_CONSUMER_KWARGS, create_topic, free_port, produce, wait_until
from .test_consume import consume_cmd, encode, events_in_store, ml100k_events

SESSION = str(GROUP_CONSUMER_KWARGS["session_timeout_ms"] / 1000)


class Replica:
    def __init__(self, bootstrap: str, topic: str, workdir: Path, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gnaq_stream.cli", "serve", "--bootstrap-servers", bootstrap,
             "--updates-topic", topic, "--store", str(workdir / name), "--group", name, "--port", str(self.port),
             "--session-timeout-seconds", SESSION, "--log-level", "INFO"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def health(self) -> dict:
        try:
            return self.get("/healthz")[1]
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            return {}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def replicas(kafka_broker, tmp_path):
    started: list[Replica] = []

    def start(topic: str, n: int) -> list[Replica]:
        for k in range(n):
            started.append(Replica(kafka_broker.bootstrap, topic, tmp_path, f"replica-{len(started)}"))
        return started[-n:]

    yield start
    for r in started:
        r.stop()


def learner_top_k(store: Path, users: list[str], k: int) -> dict[str, list[str]]:
    """The learner's own answer, computed from its store: propagate, quantize to serving rows, score."""
    with EmbeddingStore(store, read_only=True) as s:
        learner = StreamLearner.from_state(s.load(LearnerConfig()))
    learner.refresh_final_embeddings(force=True)
    cfg, g = learner.cfg, learner.graph
    user_rows = quantize_rows(learner.final_users, cfg.bits, cfg.level_dtype)
    item_rows = quantize_rows(learner.final_items, cfg.bits, cfg.level_dtype)
    index = ItemIndex(cfg.dim, cfg.bits, cfg.level_dtype)
    index.put(np.arange(len(item_rows)), item_rows)
    out = {}
    for user in users:
        u = g.users.get(user)
        best, _ = index.top_k(index.scorer.user_vector(user_rows[u]), k, np.asarray(g.user_items[u], dtype=np.int64))
        out[user] = [g.items.external[i] for i in best.tolist()]
    return out


def run_learner(bootstrap: str, topic: str, store: Path, n: int) -> None:
    proc = subprocess.run(consume_cmd(bootstrap, topic, store, "--max-events", str(n), "--micro-batch-size", "500",
                                      "--updates-topic", f"{topic}-updates"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_two_replicas_follow_the_learner_and_answer_like_it(kafka_broker, replicas, data_dir, tmp_path):
    events = ml100k_events(data_dir, 3000)
    create_topic(kafka_broker.bootstrap, "ml", partitions=2)
    create_topic(kafka_broker.bootstrap, "ml-updates", partitions=1)
    produce(kafka_broker.bootstrap, "ml", encode(events))
    pair = replicas("ml-updates", 2)
    store = tmp_path / "learner"
    run_learner(kafka_broker.bootstrap, "ml", store, len(events))
    version = inspect_store(store)["model_version"]
    for r in pair:
        wait_until(lambda: r.health().get("model_version") == version, 90, f"{r.url} at version {version}")
    users = sorted({str(u) for u, _, _ in events})[::7][:25]
    expected = learner_top_k(store, users, 20)
    for user in users:
        answers = [r.get(f"/recommend/{user}?k=20") for r in pair]
        assert all(status == 200 for status, _ in answers)
        first, second = (body for _, body in answers)
        assert first == second
        assert first["model_version"] == version
        assert [row["item"] for row in first["items"]] == expected[user]
        scores = [row["score"] for row in first["items"]]
        assert scores == sorted(scores, reverse=True)
        seen = {str(i) for u, i, _ in events if str(u) == user}
        assert not seen & set(expected[user])


def test_serving_while_the_learner_writes(kafka_broker, replicas, data_dir, tmp_path):
    events = ml100k_events(data_dir, 6000)
    create_topic(kafka_broker.bootstrap, "live", partitions=2)
    create_topic(kafka_broker.bootstrap, "live-updates", partitions=1)
    produce(kafka_broker.bootstrap, "live", encode(events[:1000]))
    (replica,) = replicas("live-updates", 1)
    store = tmp_path / "learner"
    learner = subprocess.Popen(consume_cmd(kafka_broker.bootstrap, "live", store, "--max-events", "6000",
                                           "--micro-batch-size", "250", "--refresh-seconds", "0.2",
                                           "--updates-topic", "live-updates"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    users = sorted({str(u) for u, _, _ in events[:1000]})
    wait_until(lambda: replica.health().get("users", 0) >= len(users), 90, "the first 1000 events served")
    answers: list[tuple[int, dict]] = []
    done = threading.Event()

    def hammer() -> None:
        k = 0
        while not done.is_set():
            answers.append(replica.get(f"/recommend/{users[k % len(users)]}?k=10"))
            k += 1

    thread = threading.Thread(target=hammer)
    thread.start()
    produce(kafka_broker.bootstrap, "live", encode(events[1000:]))
    _, stderr = learner.communicate(timeout=240)
    assert learner.returncode == 0, stderr[-2000:]
    final = inspect_store(store)["model_version"]
    wait_until(lambda: replica.health().get("model_version") == final, 90, "the replica catching up")
    done.set()
    thread.join()
    assert len(answers) > 20
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [body["model_version"] for _, body in answers]
    assert versions == sorted(versions) and versions[-1] > versions[0]  # several versions, never backwards
    for _, body in answers:
        assert len(body["items"]) == 10 and body["user_version"] <= final


def test_bad_requests_get_json_4xx_and_the_service_keeps_serving(kafka_broker, replicas, data_dir, tmp_path):
    events = ml100k_events(data_dir, 1000)
    create_topic(kafka_broker.bootstrap, "bad", partitions=1)
    produce(kafka_broker.bootstrap, "bad", encode(events))
    (replica,) = replicas("bad-updates", 1)
    run_learner(kafka_broker.bootstrap, "bad", tmp_path / "learner", len(events))
    version = inspect_store(tmp_path / "learner")["model_version"]
    wait_until(lambda: replica.health().get("model_version") == version, 90, "the replica caught up")
    user = str(events[0][0])
    cases = {
        "/recommend/no-such-user?k=5": 404,
        f"/recommend/{user}?k=0": 400,
        f"/recommend/{user}?k=-3": 400,
        f"/recommend/{user}?k=100000000": 400,
        f"/recommend/{user}?k=ten": 400,
        f"/recommend/{user}?k=": 400,
        "/recommend/" + "x" * 10000: 400,
        "/no/such/route": 404,
    }
    for path, status in cases.items():
        got, body = replica.get(path)
        assert (got, sorted(body)) == (status, ["error"]), path[:60]
    status, body = replica.get(f"/recommend/{user}?k=5")
    assert status == 200 and len(body["items"]) == 5


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "gnaq-stream.json"


def dashboard_metric_names() -> set[str]:
    """Every metric name referenced by a PromQL expression of the provisioned dashboard."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    return {name for expr in exprs for name in re.findall(r"\b(gnaq_[a-z0-9_]+)\b", expr)}


def test_every_metric_the_dashboard_queries_is_exported(kafka_broker, replicas, start_prometheus, data_dir,
                                                        tmp_path):
    events = ml100k_events(data_dir, 1500)
    create_topic(kafka_broker.bootstrap, "dash", partitions=1)
    produce(kafka_broker.bootstrap, "dash", encode(events))
    (replica,) = replicas("dash-updates", 1)
    port = free_port()
    learner = subprocess.Popen(consume_cmd(kafka_broker.bootstrap, "dash", tmp_path / "learner", "--metrics-port",
                                           str(port), "--micro-batch-size", "250", "--updates-topic", "dash-updates"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: replica.health().get("users", 0) > 0, 120, "the replica's first rows")
        user = str(events[0][0])
        assert replica.get(f"/recommend/{user}?k=10")[0] == 200
        assert replica.get("/recommend/nobody?k=10")[0] == 404
        prom = start_prometheus([f"127.0.0.1:{port}", f"127.0.0.1:{replica.port}"])
        wait_until(lambda: prom.targets_health() == ["up", "up"], 30, "both targets up")
        for name in sorted(dashboard_metric_names()):
            prom.wait_for(f"count({name})", timeout=30)
    finally:
        learner.send_signal(signal.SIGTERM)
        _, err = learner.communicate(timeout=60)
    assert learner.returncode == 0, err.decode()[-2000:]


def published(events: list[Event], stale_keys: list[bytes] = ()) -> tuple[StreamLearner, list]:
    """A new model learnt in-process from `events` and the records of its first publication."""
    learner, producer = StreamLearner(LearnerConfig(dim=8, bits=2, refine_steps=1)), RecordingProducer()
    learner.apply_micro_batch(events)
    learner.refresh_final_embeddings(force=True)
    UpdatesPublisher(producer, "updates", 2, stale_keys=stale_keys).publish(learner, np.arange(learner.graph.n_users))
    return learner, producer.records


def send(bootstrap: str, topic: str, records: list, partition: int = 0) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [producer.send(topic, key=key, value=value, partition=partition) for key, value in records]
        producer.flush(30)
        for future in futures:
            future.get(30)
    finally:
        producer.close(timeout=10)


def scrape(replica: Replica, sample: str) -> float:
    with urllib.request.urlopen(replica.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return float(re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M).group(1))


def test_readiness_bad_records_a_model_switch_and_no_internal_pages(kafka_broker, replicas):
    bootstrap = kafka_broker.bootstrap
    create_topic(bootstrap, "upd", partitions=2)  # the learner refuses this; a replica reads partition 0 only
    (replica,) = replicas("upd", 1)
    wait_until(lambda: replica.health(), 60, "the replica's web server")
    status, body = replica.get("/healthz")
    assert status == 503 and body["status"] == "waiting" and body["meta"] is None
    assert set(body) == {"status", "model_version", "users", "items", "model_bytes", "meta"}
    for path in ("/router", "/router/", "/table", "/table/", "/", "/graph", "/assignment/", "/performance/"):
        assert replica.get(path) == (404, {"error": "Not Found"}), path

    a, a_records = published([Event(f"u{k % 5}", f"i{k % 7}", float(k)) for k in range(12)])
    row = next(value for key, value in a_records if key[:1] == b"U")[8:]
    bad = [(META_KEY, b"[1]"), row_record("user", 0, "u0", 10**6, row + b"\x00"),
           row_record("item", 2**32 - 1, "x", 1, row)]
    send(bootstrap, "upd", [(b"U\x00\x00\x00\x00u0", a_records[-2][1])], partition=1)
    send(bootstrap, "upd", a_records[:1] + bad + a_records[1:-1])  # all of model A but its final meta record
    wait_until(lambda: replica.health().get("users") == 5 and replica.health().get("items") == 7, 60, "A's rows")
    status, body = replica.get("/healthz")
    assert (status, body["status"], body["model_version"]) == (503, "waiting", -1)
    send(bootstrap, "upd", a_records[-1:])
    wait_until(lambda: replica.health().get("status") == "ok", 60, "A complete")
    assert replica.get("/healthz")[0] == 200 and replica.get("/recommend/u2?k=3")[0] == 200
    for reason in ("malformed", "width", "index", "partition"):
        wait_until(lambda: scrape(replica, f'gnaq_serve_updates_rejected_total{{reason="{reason}"}}') == 1, 30, reason)
    assert scrape(replica, "gnaq_serve_memory_bytes") > scrape(replica, "gnaq_serve_model_bytes") == 12 * len(row)

    a_keys = list(dict.fromkeys(key for key, _ in a_records if key != META_KEY))
    b, b_records = published([Event("u0", "i1", 1.0), Event("v0", "j0", 2.0), Event("v1", "j1", 3.0)], a_keys)
    send(bootstrap, "upd", b_records)  # A's keys deleted, then B
    wait_until(lambda: (replica.health().get("meta") or {}).get("model_id") == b.model_id
               and replica.health()["status"] == "ok", 60, "B complete")
    assert replica.get("/recommend/u2?k=3")[0] == 404  # A's only
    status, body = replica.get("/recommend/v0?k=10")
    assert status == 200 and {row["item"] for row in body["items"]} == {"i1", "j1"}
    for user, expected in (("é" * 256, 404), ("é" * 257, 400)):  # ids of up to 256 characters, as events
        assert replica.get("/recommend/" + urllib.parse.quote(user))[0] == expected


def test_a_new_users_first_event_is_served(kafka_broker, replicas, data_dir, tmp_path):
    events = ml100k_events(data_dir, 1500)
    create_topic(kafka_broker.bootstrap, "fresh", partitions=1)
    create_topic(kafka_broker.bootstrap, "fresh-updates", partitions=1)
    produce(kafka_broker.bootstrap, "fresh", encode(events))
    (replica,) = replicas("fresh-updates", 1)
    store = tmp_path / "learner"
    learner = subprocess.Popen(consume_cmd(kafka_broker.bootstrap, "fresh", store, "--consolidate-pairs-per-event", "0",
                                           "--updates-topic", "fresh-updates"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: events_in_store(store) == 1500, 90, "the backlog stored")
        wait_until(lambda: replica.health().get("status") == "ok", 90, "the replica ready")
        version = replica.health()["model_version"]
        newcomer, known_item = "new-user-1", str(events[0][1])
        assert replica.get(f"/recommend/{newcomer}?k=5")[0] == 404
        produce(kafka_broker.bootstrap, "fresh", encode([(newcomer, known_item, 2_000_000_000)]))

        def served():
            answer = replica.get(f"/recommend/{newcomer}?k=5")
            return answer if answer[0] == 200 else None

        _, body = wait_until(served, 60, "the new user served")
        assert body["user_version"] > version and len(body["items"]) == 5
        assert known_item not in [row["item"] for row in body["items"]]  # its history came with it
    finally:
        learner.send_signal(signal.SIGTERM)
        _, err = learner.communicate(timeout=60)
    assert learner.returncode == 0, err[-2000:]
