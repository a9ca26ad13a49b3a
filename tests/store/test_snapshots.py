"""The graph snapshot + short log: a restart reproduces the exact state, the log shrinks to what
came after the snapshot, and a kill -9 in the middle of a snapshot loses nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from gnaq_stream.config import LearnerConfig
from gnaq_stream.store import embedding_store
from gnaq_stream.store.embedding_store import EmbeddingStore, _scan
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.pipeline import MicroBatchPipeline

CFG = LearnerConfig(dim=8, bits=2, refine_steps=1, prequential_sample=0.0)


def _events(n, seed=0):
    rng = np.random.default_rng(seed)
    users, items = rng.zipf(1.6, n) % 400, rng.zipf(1.4, n) % 150
    return [(f"u{u}", f"i{i}") for u, i in zip(users.tolist(), items.tolist())]


def _records(events, start):
    from types import SimpleNamespace
    return [SimpleNamespace(topic="t", partition=0, offset=start + k, timestamp=0, key=None,
                            value=json.dumps({"user": u, "item": i, "ts": 1}).encode())
            for k, (u, i) in enumerate(events)]


def _log_events(store: EmbeddingStore) -> int:
    return sum(len(value) // 8 for _, value in _scan(store.db, b"E"))


def test_snapshot_and_log_restart_reproduce_the_exact_state(tmp_path):
    events = _events(3010)
    with EmbeddingStore(tmp_path / "s") as store:
        learner = StreamLearner(CFG)
        store.write(learner.initial_changes())
        pipe = MicroBatchPipeline(learner, store, snapshot_min_events=500)
        snapshots = []
        for start in range(0, 3000, 250):
            pipe.process(_records(events[start:start + 250], start))
            pipe.wait_snapshot()  # written in the background: wait to look at the store
            snapshots.append(store.snapshot_meta()["version"])
            # the log holds only what came after the snapshot: never more than max(500, edges / 4) events
            assert _log_events(store) == learner.graph.n_events - store.snapshot_meta()["events"]
            assert _log_events(store) < max(500, learner.graph.n_edges // 4) + 250
        assert len(set(snapshots)) >= 3  # renewed several times on the way
        pipe.process(_records(events[3000:], 3000))  # the restart below reads a snapshot and a log
        pipe.close()
        assert 0 < _log_events(store) < learner.graph.n_events
    with EmbeddingStore(tmp_path / "s") as store:
        back = StreamLearner.from_state(store.load(CFG))
        assert store.offsets() == {("t", 0): len(events)}
    assert back.graph.event_counts() == dict(Counter(events)) == learner.graph.event_counts()
    assert list(back.graph.users.external) == list(learner.graph.users.external)
    assert list(back.graph.items.external) == list(learner.graph.items.external)
    assert np.array_equal(back.graph.user_degrees(), learner.graph.user_degrees())
    for mine, theirs in ((back.users, learner.users), (back.items, learner.items)):
        idx = np.arange(theirs.n)
        assert mine.n == theirs.n and np.array_equal(mine.packed(idx), theirs.packed(idx))
        assert np.array_equal(mine.version[:mine.n], theirs.version[:theirs.n])
    assert torch.equal(back.graph.normalized_adjacency().to_dense(), learner.graph.normalized_adjacency().to_dense())


class _GatedPuts:
    """The store's database with single puts (only snapshot chunks are) held until a gate opens."""

    def __init__(self, db, gate: threading.Event):
        self.db, self.gate = db, gate

    def put(self, key, value):
        self.gate.wait(30)
        self.db.put(key, value)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_micro_batches_go_on_while_a_snapshot_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding_store, "SNAPSHOT_CHUNK_EDGES", 8)
    events, gate = _events(2000, seed=2), threading.Event()
    with EmbeddingStore(tmp_path / "s") as store:
        learner = StreamLearner(CFG)
        store.write(learner.initial_changes())
        store.db = _GatedPuts(store.db, gate)
        pipe = MicroBatchPipeline(learner, store, snapshot_min_events=500)
        at = 0
        while not any(t.name == "graph-snapshot" for t in threading.enumerate()):
            pipe.process(_records(events[at:at + 100], at))
            at += 100
        started = learner.version  # the snapshot holds the graph as of this batch
        assert store.snapshot_meta()["version"] == -1
        for _ in range(5):  # the snapshot is held at its first chunk; batches are applied and stored
            pipe.process(_records(events[at:at + 100], at))
            at += 100
        assert store.state_meta()["n_events"] == at and store.snapshot_meta()["version"] == -1
        gate.set()
        pipe.wait_snapshot()
        assert store.snapshot_meta()["version"] == started
        assert _log_events(store) == at - store.snapshot_meta()["events"]  # the log: what came after it
        pipe.close()
        store.db = store.db.db
    with EmbeddingStore(tmp_path / "s") as store:
        back = StreamLearner.from_state(store.load(CFG))
    assert back.graph.event_counts() == dict(Counter(events[:at])) == learner.graph.event_counts()


# streams the events from where the store stopped, the pipeline renewing its snapshot in the
# background every few batches (tiny chunks, each written slowly, so a snapshot takes a while), and
# says "snapshot" on stdout as each one starts
_WORKER = textwrap.dedent("""
    import json, sys, time
    from types import SimpleNamespace
    from gnaq_stream.config import LearnerConfig
    from gnaq_stream.store import embedding_store
    from gnaq_stream.store.embedding_store import EmbeddingStore
    from gnaq_stream.stream.learner import StreamLearner
    from gnaq_stream.stream.pipeline import MicroBatchPipeline

    embedding_store.SNAPSHOT_CHUNK_EDGES = 8
    events = json.load(open(sys.argv[2]))
    cfg = LearnerConfig(dim=8, bits=2, refine_steps=1, prequential_sample=0.0)
    store = EmbeddingStore(sys.argv[1])
    if store.is_empty():
        learner = StreamLearner(cfg)
        store.write(learner.initial_changes())
    else:
        learner = StreamLearner.from_state(store.load(cfg))
    class SlowPuts:  # only snapshot chunks are single puts: slowed, a kill lands inside a snapshot
        def __init__(self, db):
            self.db = db
        def put(self, key, value):
            time.sleep(0.002)
            self.db.put(key, value)
        def __getattr__(self, name):
            return getattr(self.db, name)
    if sys.argv[3] == "slow":
        store.db = SlowPuts(store.db)
    write_snapshot = store.write_snapshot
    def announced(*args):
        print("snapshot", flush=True)
        write_snapshot(*args)
    store.write_snapshot = announced
    pipe = MicroBatchPipeline(learner, store, snapshot_min_events=40)
    start = store.offsets().get(("t", 0), 0)
    for at in range(start, len(events), 40):
        pipe.process([SimpleNamespace(topic="t", partition=0, offset=at + k, timestamp=0, key=None,
                                      value=json.dumps({"user": u, "item": i, "ts": 1}).encode())
                      for k, (u, i) in enumerate(events[at:at + 40])])
        time.sleep(0.01)
    pipe.close()
    print("done", flush=True)
""")


def test_kill_9_during_a_snapshot_loses_and_repeats_nothing(tmp_path):
    # enough events that five killed runs (each up to its first snapshot, ~300 events, plus what
    # runs while the kill waits) never reach the end: a run that finished would exit 0, not -9
    events = _events(4000, seed=1)
    (tmp_path / "events.json").write_text(json.dumps(events))
    store_dir = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    interrupted = 0
    for attempt in range(6):  # the last run is left to finish
        proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(store_dir), str(tmp_path / "events.json"),
                                 "slow" if attempt < 5 else "fast"],
                                stdout=subprocess.PIPE, text=True, env=env)
        seen = 0
        for line in proc.stdout:
            seen += line.startswith("snapshot")
            if attempt < 5 and seen == 1:  # kill as a snapshot writes its chunks (~0.1-0.2 s) beside batches
                time.sleep(0.02 * (1 + attempt))
                proc.send_signal(signal.SIGKILL)
                break
        assert proc.wait() == (-signal.SIGKILL if attempt < 5 else 0)
        with EmbeddingStore(store_dir) as store:
            current = store.snapshot_meta()["version"]
            versions = {int.from_bytes(key[1:9], "big") for key, _ in _scan(store.db, b"G")}
            interrupted += bool(versions - {current})  # chunks of a snapshot that never became current
            done = store.offsets().get(("t", 0), 0)
            back = StreamLearner.from_state(store.load(CFG))
        assert back.graph.event_counts() == dict(Counter(events[:done]))
    assert done == len(events)
    assert interrupted >= 1  # at least one kill landed inside a snapshot
