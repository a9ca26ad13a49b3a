"""`simulator replay` end to end on ml-100k through a real (embedded Tansu) broker and a real
`gnaq-stream consume` process; clear errors; nothing left running afterwards, also after Ctrl-C."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gnaq_stream.checkpoint import load_checkpoint
from gnaq_stream.data.datasets import load_dataset
from gnaq_stream.graph.interaction_graph import normalized_adjacency, unique_edges
from gnaq_stream.model.lightgcn import propagate
from simulator.cli import build_parser
from simulator.protocol import SCENARIOS, build_replay

SMALL = ["--base-fraction", "0.6", "--block-fraction", "0.2", "--epochs", "3", "--dim", "16", "--batch-size", "4096"]
# one torch thread: the machine's other cores may be busy, and two contending threads are much slower
ENV = {**os.environ, "GNAQ_THREADS": "1", "OMP_NUM_THREADS": "1"}


def simulator(*args: str) -> list[str]:
    return [sys.executable, "-m", "simulator.cli", "replay", *args]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes (other than this one) that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("replay")
    proc = subprocess.run(simulator("--dataset", "ml-100k", "--out", str(out), "--data-dir", str(data_dir), *SMALL),
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), proc


def test_report_is_complete(replay_run):
    out, report, proc = replay_run
    assert f"report: {out / 'report.md'}" in proc.stdout
    for png in ("accuracy.png", "model_bytes.png", "update_cost.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["blocks"]) == 2
    for block in report["blocks"]:
        assert set(block["models"]) == {"static", "retrain", "stream"}
        for row in block["models"].values():
            for key in ("recall@20", "ndcg@20", "update_seconds", "bytes_model"):
                assert math.isfinite(row[key]) and row[key] >= 0
    assert "true time order" in report["order"]
    md = (out / "report.md").read_text()
    assert "true time order" in md and "![accuracy per block](accuracy.png)" in md
    assert len(re.findall(r"^\| [12] \| 20,000 \|", md, flags=re.M)) == 6  # 2 blocks x 3 models
    summary = report["summary"]
    blocks = report["blocks"]
    for model in ("static", "retrain", "stream"):
        mean = sum(b["models"][model]["recall@20"] for b in blocks) / len(blocks)
        assert summary["avg_recall@20"][model] == pytest.approx(mean)
        assert f"| {model} | {mean:.4f} |" in md
    assert summary["stream_retrain_recall_ratio"] == pytest.approx(
        summary["avg_recall@20"]["stream"] / summary["avg_recall@20"]["retrain"])
    assert summary["retrain_stream_cost_ratio"] == pytest.approx(
        summary["update_seconds"]["retrain"] / summary["update_seconds"]["stream"])


def test_events_add_up_to_the_dataset(replay_run, data_dir):
    _, report, _ = replay_run
    data = load_dataset("ml-100k", data_dir)
    blocks = report["blocks"]
    assert report["events"] == len(data.train) + len(data.test) == 100_000
    assert report["base"]["events"] + sum(b["events"] for b in blocks) == report["events"]
    assert blocks[0]["start"] == report["base"]["events"] and blocks[-1]["end"] == report["events"]
    assert all(a["end"] == b["start"] for a, b in zip(blocks, blocks[1:]))
    # the learner stored every streamed event on top of the base model's edges
    final = report["stream_final"]
    assert final["events_in_store"] == final["expected_events_in_store"]
    assert (final["users"], final["items"]) == (report["users"], report["items"]) == (943, 1682)


def test_static_equals_a_direct_evaluation_of_the_base_checkpoint(replay_run, data_dir):
    out, report, _ = replay_run
    model = load_checkpoint(out / "base")
    replay = build_replay(load_dataset("ml-100k", data_dir), "none", 0.6, 0.2, seed=2025)
    base_end = replay.bounds[1]
    u, i = unique_edges(replay.users[:base_end], replay.items[:base_end])
    np.testing.assert_array_equal(model.edges, np.stack([u, i], 1))
    adj = normalized_adjacency(model.n_users, model.n_items, model.edges[:, 0], model.edges[:, 1])
    final = propagate(adj, model.layer0(), model.n_layers).numpy()
    users, items = final[:model.n_users], final[model.n_users:]
    discounts = 1 / np.log2(np.arange(2, 22))
    for block in report["blocks"]:
        start, end = block["start"], block["end"]
        history: dict[int, set[int]] = {}
        for a, b in zip(replay.users[:start].tolist(), replay.items[:start].tolist()):
            history.setdefault(a, set()).add(b)
        truth: dict[int, set[int]] = {}
        for a, b in zip(replay.users[start:end].tolist(), replay.items[start:end].tolist()):
            if b not in history.get(a, set()):
                truth.setdefault(a, set()).add(b)
        recalls, ndcgs = [], []
        for user, wanted in truth.items():
            if user >= model.n_users:  # never seen by the base model: a miss
                recalls.append(0.0)
                ndcgs.append(0.0)
                continue
            scores = users[user] @ items.T
            scores[[b for b in history.get(user, ()) if b < model.n_items]] = -np.inf
            top = np.argsort(-scores, kind="stable")[:20]
            hits = np.array([t in wanted for t in top])
            recalls.append(hits.sum() / len(wanted))
            ndcgs.append((hits * discounts).sum() / discounts[:min(len(wanted), 20)].sum())
        static = block["models"]["static"]
        assert static["recall@20"] == pytest.approx(np.mean(recalls), abs=1e-4)
        assert static["ndcg@20"] == pytest.approx(np.mean(ndcgs), abs=1e-4)
        assert block["eval_users"] == len(truth)
    first = report["blocks"][0]["models"]
    # before anything is streamed, the learner is the base model and retrain is the base model
    for model_name in ("retrain", "stream"):
        assert first[model_name]["recall@20"] == pytest.approx(first["static"]["recall@20"], abs=1e-6)


def test_stream_and_retrain_know_every_node_seen_before_the_block(replay_run):
    _, report, _ = replay_run
    second = report["blocks"][1]
    seen_users = report["base"]["users"] + report["blocks"][0]["new_users"]
    seen_items = report["base"]["items"] + report["blocks"][0]["new_items"]
    for name in ("retrain", "stream"):
        row = second["models"][name]
        assert (row["known_users"], row["known_items"]) == (seen_users, seen_items)
        assert row["update_seconds"] > 0
        assert row["bytes_model"] > second["models"]["static"]["bytes_model"]
    assert second["models"]["static"]["unknown_interactions"] >= second["models"]["stream"]["unknown_interactions"]


def test_nothing_left_running_after_a_replay(replay_run):
    _, report, _ = replay_run
    bootstrap = re.search(r"127\.0\.0\.1:\d+", report["transport"]).group(0)
    assert processes_mentioning(bootstrap) == []


def test_unreachable_bootstrap_servers_is_a_clear_error(tmp_path, data_dir):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    proc = subprocess.run(simulator("--dataset", "ml-100k", "--out", str(tmp_path / "out"), "--data-dir", str(data_dir),
                                    "--bootstrap-servers", f"127.0.0.1:{port}", *SMALL),
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2
    assert f"simulator: error: cannot reach Kafka at 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "base").exists(), "nothing is trained before the cluster is reached"
    assert time.monotonic() - start < 60
    assert processes_mentioning(f"127.0.0.1:{port}") == []


def test_missing_dataset_is_a_clear_error(tmp_path):
    args = simulator("--dataset", "ml-100k", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2
    assert "simulator: error: dataset 'ml-100k'" in proc.stderr and "lacks u.data" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert processes_mentioning(str(tmp_path)) == []


def test_ctrl_c_stops_broker_and_learner(tmp_path, data_dir):
    out, stderr = tmp_path / "out", tmp_path / "stderr.txt"
    with open(stderr, "w") as err:  # a file, not a pipe: progress bars must never block the replay
        proc = subprocess.Popen(simulator("--dataset", "ml-100k", "--out", str(out), "--data-dir", str(data_dir),
                                          "--rate", "2000", *SMALL), stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (out / "store" / "CURRENT").exists():  # the learner is up: broker and learner run
            assert proc.poll() is None and time.monotonic() < deadline, "the replay never started its learner"
            time.sleep(0.2)
        children = children_of(proc.pid)
        assert len(children) == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "simulator: interrupted" in stderr.read_text()
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []


def test_help_documents_the_scenarios(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["replay", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in SCENARIOS) and "--bootstrap-servers" in text and "--epochs" in text
