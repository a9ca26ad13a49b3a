"""Event produced -> a replica's answer reflects it, end to end, under a steady background load.

1. Starts a Tansu broker, a learner (`gnaq-stream consume --updates-topic`, empty model) and one
   replica (`gnaq-stream serve`), all on this machine.
2. Backlog: the dataset's train split (seeded order) is produced and learned, and the replica
   catches up (its /healthz turns ready).
3. Steady phase: the test split is produced at `--rate` events/s for `--seconds`; meanwhile two
   probe threads each produce one probe event every `--probe-every` seconds (or once the last is
   answered):
   - for a brand-new user: latency = produce -> the replica answers that user (200, not 404);
   - for an existing user, on the item the replica recommends them first: latency = produce -> that
     item is no longer recommended (the user's history, published with the batch, excludes it), and
     produce -> the replica holds a complete publication of a propagation run after the event (its
     `model_version` exceeds the learner's version read just before the event was produced: every
     serving row the event changed is then served; a propagation between that read and the event's
     batch would pass too early, so this can under-read by one micro-batch), and produce -> that
     user's served row is as of a later version (`user_version`, the issue's measure) or a
     propagation after the event was published without changing it (only changed rows are sent):
     with rows published per propagation, about the same as the previous measure.
   Probes poll the replica every 10 ms, so latencies have that resolution.

    python benchmarks/freshness.py --dataset ml-1m --rate 20000 --seconds 60
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
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402
from stream_throughput import free_port, produce, sample, scrape, start_broker  # noqa: E402

from gnaq_stream.data.datasets import load_dataset  # noqa: E402


def events(users: np.ndarray, items: np.ndarray, seed: int, ts0: int) -> list[bytes]:
    order = np.random.default_rng(seed).permutation(len(users))
    return [json.dumps({"user": int(u), "item": int(i), "ts": ts0 + k}).encode()
            for k, (u, i) in enumerate(zip(users[order].tolist(), items[order].tolist()))]


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
            if got:
                return got
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def probe(new: bool, bootstrap: str, url: str, metrics_port: int, known_users: list[int], new_user_item: int,
          every: float, stop: threading.Event, out: dict[str, list[float]]) -> None:
    """Every `every` seconds a probe event: a new user's first event (answered: 200, not 404), or an
    existing user's event on their current top-1 item (reflected: the item, now in their history, is
    no longer recommended; and the rows: the replica's model version is past the learner's version
    before the event)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    k = 0
    while not stop.is_set():
        user = f"probe-{k}" if new else str(known_users[k % len(known_users)])
        item = new_user_item if new else get(f"{url}/recommend/{user}?k=1")[1]["items"][0]["item"]
        value = json.dumps({"user": user, "item": item, "ts": int(time.time())}).encode()
        before = None if new else sample(scrape(metrics_port), "gnaq_model_version")
        start = time.perf_counter()
        producer.send("events", value).get(10)
        waiting = {"new"} if new else {"existing", "row", "user_row"}
        while waiting:
            status, body = get(f"{url}/recommend/{user}?k=1")
            done = set()
            if status == 200 and new:
                done.add("new")
            elif status == 200:
                done |= {"existing"} if body["items"][0]["item"] != item else set()
                done |= {"row"} if body["model_version"] > before else set()
                # only changed rows are sent: a row a propagation after the event left as it was reflects it too
                done |= {"user_row"} if body["user_version"] > before or body["model_version"] > before else set()
            for kind in done & waiting:
                out[kind].append(time.perf_counter() - start)
                out["timeline"].append((kind, round(start - out["t0"], 2), round(time.perf_counter() - start, 2)))
            waiting -= done
            if waiting and time.perf_counter() - start > 60:
                out["timeouts"] += [60.0] * len(waiting)
                break
            time.sleep(0.01)
        k += 1
        stop.wait(max(every - (time.perf_counter() - start), 0))
    producer.close()


def watch_applied(metrics_port: int, stop: threading.Event, out: dict) -> None:
    """Every 2 s (seconds since the steady phase began, events the learner applied since): where the
    learner falls behind and whether it catches up."""
    first = sample(scrape(metrics_port), "gnaq_events_applied_total")
    while not stop.wait(2.0):
        applied = sample(scrape(metrics_port), "gnaq_events_applied_total") - first
        out["applied"].append((round(time.perf_counter() - out["t0"], 1), int(applied)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--data-dir")
    p.add_argument("--rate", type=float, default=20000.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--probe-every", type=float, default=0.5)
    p.add_argument("--refresh-seconds", type=float, help="the learner's --refresh-seconds (default: its own)")
    p.add_argument("--learner-args", default="", help="more `gnaq-stream consume` options, e.g. "
                   "'--prequential-max-scores 250'")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gnaq-fresh-"))
    broker, bootstrap = start_broker(work)
    learner = replica = None
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic("events", 1, 1), NewTopic("updates", 1, 1)])
        admin.close()
        d = load_dataset(args.dataset, args.data_dir)
        backlog = events(d.train.users, d.train.items, 3, 1_600_000_000)
        steady = events(d.test.users, d.test.items, 4, 1_700_000_000)
        steady = (steady * (int(args.rate * args.seconds) // len(steady) + 1))[:int(args.rate * args.seconds)]
        metrics_port, port = free_port(), free_port()
        learner = subprocess.Popen(
            ["gnaq-stream", "consume", "--bootstrap-servers", bootstrap, "--topic", "events", "--group", "fresh",
             "--store", str(work / "store"), "--updates-topic", "updates", "--metrics-port", str(metrics_port),
             "--session-timeout-ms", "6000", "--heartbeat-interval-ms", "2000",
             *(["--refresh-seconds", str(args.refresh_seconds)] if args.refresh_seconds else []),
             *args.learner_args.split()],
            stdout=subprocess.DEVNULL, stderr=open(work / "learner.log", "wb"))
        replica = subprocess.Popen(
            ["gnaq-stream", "serve", "--bootstrap-servers", bootstrap, "--updates-topic", "updates", "--store",
             str(work / "replica"), "--port", str(port), "--session-timeout-seconds", "6"],
            stdout=subprocess.DEVNULL, stderr=open(work / "replica.log", "wb"))
        url = f"http://127.0.0.1:{port}"
        produce(bootstrap, "events", backlog)
        wait(lambda: sample(scrape(metrics_port), "gnaq_events_applied_total") >= len(backlog), 600, "the backlog")
        wait(lambda: get(f"{url}/healthz")[0] == 200, 600, "the replica ready")
        known_users = [int(u) for u in np.unique(d.train.users)[:200]]
        out: dict = {"new": [], "existing": [], "row": [], "user_row": [], "timeouts": [], "timeline": [], "applied": [],
                     "t0": time.perf_counter()}
        stop = threading.Event()
        probers = [threading.Thread(target=probe, args=(new, bootstrap, url, metrics_port, known_users,
                                                         int(d.train.items[0]), args.probe_every, stop, out))
                   for new in (True, False)]
        applied0 = sample(scrape(metrics_port), "gnaq_events_applied_total")
        probers.append(threading.Thread(target=watch_applied, args=(metrics_port, stop, out)))
        for prober in probers:
            prober.start()
        produce_s = produce(bootstrap, "events", steady, rate=args.rate)
        stop.set()
        for prober in probers:
            prober.join()
        applied = sample(scrape(metrics_port), "gnaq_events_applied_total") - applied0
        result = {"dataset": args.dataset, "rate_target": args.rate, "rate_produced": len(steady) / produce_s,
                  "seconds": produce_s, "learner_applied": applied, "probes_new": len(out["new"]),
                  "probes_existing": len(out["existing"]), "probes_row": len(out["row"]),
                  "probes_user_row": len(out["user_row"]),
                  "timeouts": len(out["timeouts"]), "refresh_seconds": args.refresh_seconds,
                  "learner_args": args.learner_args,
                  "timeline": out["timeline"], "applied_over_time": out["applied"]}
        for kind in ("new", "existing", "row", "user_row"):
            if out[kind]:
                result[f"{kind}_p50"], result[f"{kind}_p99"] = (float(np.percentile(out[kind], q)) for q in (50, 99))
        print(json.dumps(result), flush=True)
        write_section("freshness", report(result))
    finally:
        for proc in (learner, replica):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def report(r: dict) -> str:
    def row(kind: str) -> str:
        if f"{kind}_p50" not in r:
            return "no probe answered"
        return f"{r[f'{kind}_p50']:.2f} s / {r[f'{kind}_p99']:.2f} s ({r[f'probes_{kind}']} probes)"

    return f"""## Freshness: event produced -> served answer reflects it (`benchmarks/freshness.py`)

One learner (`gnaq-stream consume --updates-topic`, empty model, default settings) and one replica
(`gnaq-stream serve`) with a Tansu broker on this machine. After the {r['dataset']} train split is
learned as a backlog, its test split is produced at {r['rate_target']:,.0f} events/s
(achieved {r['rate_produced']:,.0f}/s for {r['seconds']:.0f} s; the learner applied
{r['learner_applied']:,.0f} events meanwhile) while probe events measure produce -> answer.

| measure | p50 / p99 | target |
|---|---|---|
| a new user's first event -> the replica answers that user (not 404) | {row('new')} | p99 <= 2 s |
| an existing user's event on their top-1 item -> the item is no longer recommended | {row('existing')} | p99 <= 2 s |
| the same event -> the replica serves a propagation run after it (`model_version`) | {row('row')} | p99 <= 2 s |
| the same event -> the user's served row is as of a version after it (`user_version`) | {row('user_row')} | p99 <= 2 s |
| probes not answered within 60 s | {r['timeouts']} | 0 |
"""


if __name__ == "__main__":
    main()
