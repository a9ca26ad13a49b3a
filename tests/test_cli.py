"""The CLI end to end on ml-100k: trains, beats popularity, and turns bad input into clear errors."""

import json
import subprocess
import sys

import pytest

from gnaq_stream.data.datasets import load_dataset
from gnaq_stream.train.evaluation import evaluate_ranking, interaction_matrix, popularity_scores


def run_cli(*args, data_dir):
    proc = subprocess.run([sys.executable, "-m", "gnaq_stream.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=600)
    return proc


def last_json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("fp")
    proc = run_cli("train", "--dataset", "ml-100k", "--method", "fp", "--epochs", "25", "--batch-size", "4096",
                   "--out", str(out), "--json", data_dir=data_dir)
    return out, last_json(proc)


def test_fp_beats_popularity(fp_run, data_dir):
    _, result = fp_run
    d = load_dataset("ml-100k", data_dir)
    history = interaction_matrix(d.n_users, d.n_items, d.train)
    pop = evaluate_ranking(*popularity_scores(d.n_users, history),
                           interaction_matrix(d.n_users, d.n_items, d.test), history)
    for key in ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "bytes_model", "bytes_fp32", "compression",
                "train_seconds"):
        assert key in result
    assert result["recall@20"] > pop["recall@20"]
    assert result["compression"] == 1.0


@pytest.mark.parametrize("method,bits", [("gnaq", 2), ("gnaq", 1), ("ste", 2), ("gnaq-paper", 2)])
def test_quantized_training_from_checkpoint(fp_run, data_dir, tmp_path, method, bits):
    fp_dir, fp_result = fp_run
    proc = run_cli("train", "--dataset", "ml-100k", "--method", method, "--bits", str(bits), "--epochs", "3",
                   "--batch-size", "4096", "--init", str(fp_dir), "--out", str(tmp_path), "--json", data_dir=data_dir)
    result = last_json(proc)
    assert result["bits"] == bits
    bias = 4 * 1682 if method == "gnaq-paper" else 0  # gnaq-paper's float32 bias per item
    assert result["bytes_model"] == (1682 + 943) * (64 * bits // 8 + (1 << bits)) + bias
    assert result["recall@20"] > 0.0
    evaluated = last_json(run_cli("evaluate", "--checkpoint", str(tmp_path), "--dataset", "ml-100k", "--json",
                                  data_dir=data_dir))
    assert evaluated["recall@20"] == pytest.approx(result["recall@20"])
    if method == "gnaq" and bits == 2:
        assert result["recall@20"] >= 0.9 * fp_result["recall@20"]


@pytest.mark.parametrize("args,message", [
    (["train", "--dataset", "nope", "--out", "x"], "unknown dataset 'nope'"),
    (["train", "--dataset", "ml-100k", "--bits", "5", "--out", "x"], "bits must be one of"),
    (["train", "--dataset", "ml-100k", "--method", "magic", "--out", "x"], "invalid choice"),
    (["train", "--dataset", "ml-100k", "--epochs", "0", "--out", "x"], "epochs must be >= 1"),
    (["evaluate", "--checkpoint", "/nonexistent", "--dataset", "ml-100k"], "not a checkpoint"),
])
def test_bad_input_is_a_clear_error(args, message, data_dir):
    proc = run_cli(*args, data_dir=data_dir)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_dataset_folder(tmp_path):
    proc = run_cli("train", "--dataset", "gowalla", "--out", str(tmp_path / "o"), data_dir=tmp_path)
    assert proc.returncode == 2
    assert "lacks train.txt, test.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_checkpoint_via_cli(fp_run, tmp_path, data_dir):
    (tmp_path / "model.json").write_text((fp_run[0] / "model.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"broken")
    proc = run_cli("evaluate", "--checkpoint", str(tmp_path), "--dataset", "ml-100k", data_dir=data_dir)
    assert proc.returncode == 2 and "unreadable" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["consume", "serve"])
def test_every_flag_says_what_it_does_and_its_default(command):
    from gnaq_stream.cli import build_parser

    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    flags = [a for a in sub._actions if a.option_strings and a.dest not in ("help", "log_level")]
    assert len(flags) > 5
    for action in flags:
        assert action.help and not action.help.startswith("(default"), f"{action.option_strings[0]} has no description"
        assert "(default: " in action.help and f"env GNAQ_{action.dest.upper()}" in action.help
