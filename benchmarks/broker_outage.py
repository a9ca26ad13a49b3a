"""The learner through a broker outage: events lost, applied twice, and the time to catch up.

1. Starts SeaweedFS (S3) and a Tansu broker on it, so topics, records and group offsets survive the
   broker being killed (the integration tests' harness, tests/integration/conftest.py).
2. Starts `gnaq-stream consume` from an empty model and produces the dataset's interactions at a
   steady rate (its train split, in a seeded random order; every event is a distinct (user, item,
   ts)), with a producer that keeps what it cannot deliver and retries.
3. After `--before` seconds the broker is killed (SIGKILL) for `--outage` seconds, then restarted on
   the same port; production goes on throughout.
4. Once production ends and the learner has read everything, it is stopped and its store compared
   with what the producer had acknowledged: every acknowledged event must be stored exactly once
   (per (user, item) edge, the stored event count equals the acknowledged count).

    python benchmarks/broker_outage.py --dataset ml-1m --rate 2000 --before 20 --outage 30 --after 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _report import write_section  # noqa: E402
from integration.conftest import Broker, Weed, free_port  # noqa: E402  (the test harness's services)
from stream_throughput import rss_mb, sample, scrape  # noqa: E402

from gnaq_stream.config import LearnerConfig  # noqa: E402
from gnaq_stream.data.datasets import load_dataset  # noqa: E402
from gnaq_stream.store.embedding_store import EmbeddingStore  # noqa: E402
from gnaq_stream.stream.learner import StreamLearner  # noqa: E402


class SteadyProducer(threading.Thread):
    """Produces `values` at `rate` per second; counts what the broker acknowledged."""

    def __init__(self, bootstrap: str, topic: str, values: list[tuple[bytes, tuple[int, int]]], rate: float):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.values, self.rate = bootstrap, topic, values, rate
        self.acked: Counter = Counter()
        self.failed = 0
        self.lock = threading.Lock()

    def _done(self, pair: tuple[int, int]):
        def ok(_meta):
            with self.lock:
                self.acked[pair] += 1
        return ok

    def _failed(self, _exc) -> None:
        with self.lock:
            self.failed += 1

    def run(self) -> None:
        # generous timeouts: records produced during the outage wait in the producer and are retried
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, retries=1_000_000,
                                 delivery_timeout_ms=600_000, request_timeout_ms=10_000, max_block_ms=600_000,
                                 reconnect_backoff_max_ms=1000)
        start = time.perf_counter()
        for k, (value, pair) in enumerate(self.values):
            if k % 50 == 0:
                ahead = k / self.rate - (time.perf_counter() - start)
                if ahead > 0:
                    time.sleep(ahead)
            producer.send(self.topic, value).add_callback(self._done(pair)).add_errback(self._failed)
        producer.flush()
        producer.close()


def events(dataset: str, data_dir: str | None, n: int, seed: int) -> list[tuple[bytes, tuple[int, int]]]:
    d = load_dataset(dataset, data_dir)
    order = np.random.default_rng(seed).permutation(len(d.train.users))[:n]
    users, items = d.train.users[order].tolist(), d.train.items[order].tolist()
    return [(json.dumps({"user": u, "item": i, "ts": 1_700_000_000 + k}).encode(), (u, i))
            for k, (u, i) in enumerate(zip(users, items))]


def stored_pairs(store: Path) -> Counter:
    with EmbeddingStore(store, read_only=True) as s:
        g = StreamLearner.from_state(s.load(LearnerConfig())).graph
    return Counter({(int(u), int(i)): c for (u, i), c in g.event_counts().items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--data-dir")
    p.add_argument("--rate", type=float, default=2000.0, help="events/s produced, steadily")
    p.add_argument("--before", type=float, default=20.0, help="seconds of production before the broker is killed")
    p.add_argument("--outage", type=float, default=30.0, help="seconds the broker is down")
    p.add_argument("--after", type=float, default=30.0, help="seconds of production after it is back")
    p.add_argument("--partitions", type=int, default=2)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gnaq-outage-"))
    weed, broker, learner = Weed(work / "weed"), None, None
    try:
        weed.start()
        broker = Broker(work / "tansu", storage="s3://tansu/", env=weed.tansu_env())
        broker.start()
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([NewTopic("events", args.partitions, 1)])
        admin.close()
        port, store = free_port(), work / "store"
        learner = subprocess.Popen(
            ["gnaq-stream", "consume", "--bootstrap-servers", broker.bootstrap, "--topic", "events", "--group",
             "outage", "--store", str(store), "--metrics-port", str(port), "--session-timeout-ms", "6000",
             "--heartbeat-interval-ms", "2000"], stdout=subprocess.DEVNULL, stderr=open(work / "learner.log", "wb"))
        total = int(args.rate * (args.before + args.outage + args.after))
        producer = SteadyProducer(broker.bootstrap, "events", events(args.dataset, args.data_dir, total, 11),
                                  args.rate)
        producer.start()
        time.sleep(args.before)
        applied_at_kill = sample(scrape(port), "gnaq_events_applied_total")
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(30)
        killed = time.perf_counter()
        time.sleep(args.outage)
        assert learner.poll() is None, "the learner exited during the outage"
        broker.start()
        restarted = time.perf_counter()
        produced_by_restart = int(args.rate * (restarted - killed + args.before))
        while sample(scrape(port), "gnaq_events_applied_total") < produced_by_restart:
            time.sleep(0.1)
        caught_up = time.perf_counter() - restarted
        producer.join()
        acked = sum(producer.acked.values())
        deadline = time.monotonic() + 300
        while sample(scrape(port), "gnaq_events_applied_total") < acked and time.monotonic() < deadline:
            time.sleep(0.5)
        rss = rss_mb(learner.pid)
        learner.send_signal(signal.SIGTERM)
        learner.wait(120)
        stored = stored_pairs(store)
        lost = sum((producer.acked - stored).values())
        twice = sum((stored - producer.acked).values())
        result = {"dataset": args.dataset, "rate": args.rate, "outage_s": args.outage, "partitions": args.partitions,
                  "produced": total, "acked": acked, "producer_failed": producer.failed,
                  "stored": sum(stored.values()), "lost": lost, "applied_twice": twice,
                  "applied_at_kill": applied_at_kill, "catch_up_s": caught_up, "learner_exit": learner.returncode,
                  "rss_mb": rss}
        print(json.dumps(result), flush=True)
        write_section("broker_outage", report(result))
    finally:
        if learner is not None and learner.poll() is None:
            learner.kill()
        if broker is not None:
            broker.stop()
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(r: dict) -> str:
    return f"""## The learner through a broker outage (`benchmarks/broker_outage.py`)

{r['produced']:,} {r['dataset']} interactions produced at a steady {r['rate']:,.0f} events/s into a
{r['partitions']}-partition topic on a Tansu broker with S3 storage; the broker is killed (SIGKILL) for
{r['outage_s']:.0f} s mid-stream and restarted while production goes on. The learner
(`gnaq-stream consume`, default settings, empty model) is compared with what the producer had
acknowledged.

| measure | value | target |
|---|---|---|
| events acknowledged by the broker / stored by the learner | {r['acked']:,} / {r['stored']:,} | equal |
| events lost (acknowledged, not stored) | {r['lost']} | 0 |
| events applied twice (stored more often than acknowledged) | {r['applied_twice']} | 0 |
| sends the producer gave up on | {r['producer_failed']} | |
| time from broker restart to the learner having applied everything produced until then | {r['catch_up_s']:.1f} s | |
| learner exit status after SIGTERM | {r['learner_exit']} | 0 |
| learner RSS at the end | {r['rss_mb']:.0f} MB | |
"""


if __name__ == "__main__":
    main()
