"""The learner at scale: a synthetic power-law stream through the micro-batch pipeline with a real
store, then a restart. Writes section `scale` of docs/benchmarks.md.

The stream (seeded): `--users` users arrive uniformly over the stream and each stays active for
`--active` of it (those arriving near the start began before it), so events come at a steady rate
while new users keep arriving; a user's number of events is lognormal (sigma `--sigma`), scaled to
`--events` in total, spread uniformly over its active span; each event's item is drawn from a Zipf
law (exponent `--zipf`) over `--items` items, popular items scattered over the id space. Events are produced window by window (no stream held in memory)
as JSON records, and fed to `MicroBatchPipeline.process` in micro-batches of 5,000 with the default
learner settings with refinement on (`refine_steps` 1; off by default), prequential scoring on, no consolidation, no publication. Only
`process` is timed.

Per window: events/s, edges, RSS (current and peak), bytes per edge (RSS growth since the start /
edges), what the graph and node tables hold, the full propagation's cost and how many ran (it runs
on a background thread once slow: a window's RSS may include its transients, marked), the time
spent scoring (prequential), snapshot time, store bytes. At the end the store is reopened in a
fresh process (the learner's restart: store.load + StreamLearner.from_state).

    python benchmarks/scale.py --events 50000000 --users 5000000 --items 500000 --window 2500000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from gnaq_stream.config import LearnerConfig  # noqa: E402
from gnaq_stream.store.embedding_store import EmbeddingStore  # noqa: E402
from gnaq_stream.stream.learner import StreamLearner  # noqa: E402
from gnaq_stream.stream.pipeline import MicroBatchPipeline  # noqa: E402

MICRO_BATCH = 5000


class Record:
    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value")

    def __init__(self, offset: int, value: bytes):
        self.topic, self.partition, self.offset, self.timestamp, self.key, self.value = "t", 0, offset, 0, None, value


class PowerLawStream:
    """Windows of (user, item) events of the synthetic stream described above."""

    def __init__(self, events: int, users: int, items: int, active: float, sigma: float, zipf: float, seed: int):
        self.rng = np.random.default_rng(seed)
        self.start = self.rng.uniform(-active, 1.0, users)  # users seen first at the stream's start began before it
        self.active = active
        rate = self.rng.lognormal(0.0, sigma, users)
        inside = (np.minimum(self.start + active, 1.0) - np.maximum(self.start, 0.0)) / active
        self.rate = rate * events / (rate * inside).sum() / active  # expected events per unit of stream time
        weights = 1.0 / np.arange(1, items + 1) ** zipf
        self.item_cdf = np.cumsum(weights) / weights.sum()
        self.item_ids = self.rng.permutation(items)
        self.events = events

    def window(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        span = np.clip(np.minimum(t1, self.start + self.active) - np.maximum(t0, self.start), 0.0, None)
        counts = self.rng.poisson(self.rate * span)
        users = np.repeat(np.arange(len(counts)), counts)
        self.rng.shuffle(users)
        items = self.item_ids[np.searchsorted(self.item_cdf, self.rng.random(len(users)))]
        return users, items


def rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    status = Path("/proc/self/status").read_text()
    field = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("Vm")}
    return field["VmRSS"], field["VmHWM"]


def learner_bytes(learner: StreamLearner) -> tuple[int, int]:
    """(node tables, propagated state) bytes the learner holds, capacity included."""
    tables = learner.users.nbytes + learner.items.nbytes
    dense = (learner.context.nbytes + learner.aggregate.nbytes + learner.item_inner.nbytes
             + learner.final_items_t.untyped_storage().nbytes())
    return tables, dense


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


RESTART = """
import json, sys, time
from pathlib import Path
start = time.perf_counter()
from gnaq_stream.config import LearnerConfig
from gnaq_stream.store.embedding_store import EmbeddingStore
from gnaq_stream.stream.learner import StreamLearner
imported = time.perf_counter()
with EmbeddingStore(sys.argv[1]) as store:
    learner = StreamLearner.from_state(store.load(LearnerConfig()))
done = time.perf_counter()
print(json.dumps({"seconds": done - imported, "imports": imported - start, "edges": learner.graph.n_edges,
                  "events": learner.graph.n_events,
                  "peak_rss": next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                                   if l.startswith("VmHWM"))}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=50_000_000)
    p.add_argument("--users", type=int, default=5_000_000)
    p.add_argument("--items", type=int, default=500_000)
    p.add_argument("--window", type=int, default=2_500_000)
    p.add_argument("--active", type=float, default=0.2, help="share of the stream a user is active for")
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--store", help="store directory (default: a temporary one)")
    p.add_argument("--out", default="runs/scale.json")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(2)
    store_dir = Path(args.store or tempfile.mkdtemp(prefix="gnaq-scale-")) / "store"
    stream = PowerLawStream(args.events, args.users, args.items, args.active, args.sigma, args.zipf, args.seed)
    store = EmbeddingStore(store_dir)
    learner = StreamLearner(LearnerConfig(refine_steps=1))  # the condition: refinement on
    store.write(learner.initial_changes())
    pipeline = MicroBatchPipeline(learner, store, max_nodes=0)
    spent = {"score": 0.0, "snapshot": 0.0}
    for name, obj, attr in (("score", pipeline.prequential, "score"), ("snapshot", store, "write_snapshot")):
        real = getattr(obj, attr)

        def timed(*a, _real=real, _name=name, **k):
            start = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - start
        setattr(obj, attr, timed)
    base_rss, _ = rss()
    rows, offset, t = [], 0, 0.0
    n_windows = -(-args.events // args.window)
    for w in range(n_windows):
        users, items = stream.window(w / n_windows, (w + 1) / n_windows)
        busy, refreshes0, score0, snap0 = 0.0, learner.refreshes, spent["score"], spent["snapshot"]
        for s in range(0, len(users), MICRO_BATCH):
            records = [Record(offset + k, b'{"user":"u%d","item":"i%d","ts":1}' % (u, i))
                       for k, (u, i) in enumerate(zip(users[s:s + MICRO_BATCH].tolist(),
                                                      items[s:s + MICRO_BATCH].tolist()))]
            start = time.perf_counter()
            pipeline.process(records)
            busy += time.perf_counter() - start
            offset += len(records)
        g = learner.graph
        now, peak = rss()
        tables, dense = learner_bytes(learner)
        row = {"events": g.n_events, "edges": g.n_edges, "users": g.n_users, "items": g.n_items,
               "events_per_s": len(users) / busy, "rss": now, "peak_rss": peak,
               "bytes_per_edge": (now - base_rss) / g.n_edges, "graph_bytes": g.nbytes, "table_bytes": tables,
               "propagated_bytes": dense, "refresh_s": learner.refresh_cost,
               "refreshes": learner.refreshes - refreshes0, "score_s": spent["score"] - score0,
               "snapshot_s": spent["snapshot"] - snap0, "busy_s": busy, "store_bytes": du(store_dir),
               "propagating": learner.refreshing}
        rows.append(row)
        print(json.dumps(row), flush=True)
    learner.wait_refresh()  # a background propagation must not run during the restart's measurement
    pipeline.close()
    store.close()
    restart = json.loads(subprocess.run([sys.executable, "-c", RESTART, str(store_dir)], check=True,
                                        capture_output=True, text=True).stdout)
    print(json.dumps({"restart": restart}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "windows": rows, "restart": restart}, indent=1))
    if not args.no_doc:
        write_section("scale", report(args, rows, restart))


def report(args, rows: list[dict], restart: dict) -> str:
    mb = 1 / 2**20
    lines = [f"## The learner at scale (`benchmarks/scale.py`)\n",
             f"{args.events:,} synthetic events ({args.users:,} users arriving over the stream, each active for "
             f"{args.active:.0%} of it, lognormal activity sigma {args.sigma}; Zipf({args.zipf}) over "
             f"{args.items:,} items; seed {args.seed}) through "
             "`MicroBatchPipeline.process` with a real store, default learner settings with refinement on (`refine_steps` 1). "
             "Bytes per edge = RSS growth since the start / edges.\n",
             "| events | edges | users | items | events/s | RSS MB (peak) | bytes/edge | graph MB | tables MB | "
             "propagated MB | refresh s (runs) | scoring s (with the propagations it ran) | snapshot s (written in the background) | store MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['events']:,} | {r['edges']:,} | {r['users']:,} | {r['items']:,} | {r['events_per_s']:,.0f} | "
                     f"{r['rss'] * mb:,.0f}{'*' if r.get('propagating') else ''} ({r['peak_rss'] * mb:,.0f}) | "
                     f"{r['bytes_per_edge']:.0f} | "
                     f"{r['graph_bytes'] * mb:,.0f} | {r['table_bytes'] * mb:,.0f} | {r['propagated_bytes'] * mb:,.0f} | "
                     f"{r['refresh_s']:.1f} ({r['refreshes']}) | {r['score_s']:.1f} | {r['snapshot_s']:.1f} | "
                     f"{r['store_bytes'] * mb:,.0f} |")
    # RSS read while a background propagation runs includes its transient arrays (several GB at 50M
    # edges): the growth is taken between the first and last windows read without one
    steady = [r for r in rows if not r.get("propagating")] or rows
    first, last = steady[0], steady[-1]
    marginal = (last["rss"] - first["rss"]) / max(last["edges"] - first["edges"], 1)
    end = rows[-1]
    held = (end["graph_bytes"] + end["table_bytes"] + end["propagated_bytes"]) / end["edges"]
    lines.append(f"\nRSS growth per edge added from {first['events']:,} to {last['events']:,} events (the first and last "
                 f"windows read with no propagation running; * in the table: one was): {marginal:.0f} bytes; what "
                 f"the graph, node tables and propagated state hold at the end: {held:.0f} bytes per edge. "
                 f"events/s in the last window / the first: {rows[-1]['events_per_s'] / rows[0]['events_per_s']:.2f}. "
                 f"Restart (fresh process, store.load + StreamLearner.from_state): {restart['seconds']:.1f} s for "
                 f"{restart['edges']:,} edges and {restart['events']:,} events, peak RSS "
                 f"{restart['peak_rss'] * mb:,.0f} MB.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
