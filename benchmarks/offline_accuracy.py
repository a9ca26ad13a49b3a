"""Offline accuracy and size of every method on the same split, epoch budget and seed.

Trains a full-precision LightGCN per dataset, then every quantized method from that checkpoint,
all through the `gnaq-stream` CLI, and writes one Markdown table to docs/benchmarks.md
(section `offline_accuracy`). Raw results go to runs/benchmarks/offline_accuracy.json.

    python benchmarks/offline_accuracy.py --datasets ml-1m gowalla
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

# (label, method, bits, extra CLI flags); the last rows are ablations of gnaq at 2 bits
RUNS = [
    ("gnaq", "gnaq", 2, []),
    ("gnaq-paper", "gnaq-paper", 2, []),
    ("ste", "ste", 2, []),
    ("gnaq", "gnaq", 1, []),
    ("ste", "ste", 1, []),
    ("no-rau", "no-rau", 2, []),
    ("no-dqs", "no-dqs", 2, []),
    ("no-lambda", "no-lambda", 2, []),
    ("gnaq, RAU mix falling with degree (alpha 0.5, h 10)", "gnaq", 2, ["--rau-alpha", "0.5", "--rau-half-degree", "10"]),
    ("gnaq, levels at interval centres", "gnaq", 2, ["--level-init", "centre"]),
    ("gnaq, levels at interval centres", "gnaq", 1, ["--level-init", "centre"]),
    ("gnaq, fp16 levels", "gnaq", 2, ["--level-dtype", "fp16"]),
]
# full precision: the LightGCN reference objective (BPR, one uniform negative)
FP_FLAGS = ["--n-negatives", "1", "--lambda-weight", "0", "--eval-every", "5"]


def train(dataset: str, method: str, bits: int, epochs: int, out: Path, extra: list[str], data_dir: str | None,
          init: Path | None = None) -> dict:
    cmd = ["gnaq-stream", "train", "--dataset", dataset, "--method", method, "--bits", str(bits),
           "--epochs", str(epochs), "--out", str(out), "--json", *extra]
    if init is not None:
        cmd += ["--init", str(init)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: result[k] for k in ("recall@20", "ndcg@20", "seconds_per_epoch", "epochs_run")}, flush=True)
    return result


def reused_fp(earlier: list[dict], dataset: str, epochs: int, fp_dir: Path) -> dict | None:
    """The recorded fp row of `dataset` if its checkpoint is still there and was trained for `epochs`."""
    for r in earlier:
        if r["dataset"] == dataset and r["label"] == "fp" and (fp_dir / "model.json").exists():
            config = json.loads((fp_dir / "model.json").read_text())["train_config"]
            if config["epochs"] == epochs and Path(r["checkpoint"]) == fp_dir:
                print(f"reusing {fp_dir} (trained for {epochs} epochs)", flush=True)
                return r
    return None


def table(results: list[dict]) -> str:
    lines = ["| dataset | method | bits | Recall@10 | Recall@20 | NDCG@10 | NDCG@20 | R@20 / fp | bytes | compression "
             "| s/epoch | epochs (best) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fp = {r["dataset"]: r["recall@20"] for r in results if r["label"] == "fp"}
    for r in results:
        bits = r["bits"] if r["bits"] is not None else 32
        lines.append(f"| {r['dataset']} | {r['label']} | {bits} | {r['recall@10']:.4f} | {r['recall@20']:.4f} | "
                     f"{r['ndcg@10']:.4f} | {r['ndcg@20']:.4f} | {r['recall@20'] / fp[r['dataset']]:.1%} | "
                     f"{r['bytes_model']:,} | {r['compression']:.1f}x | {r['seconds_per_epoch']:.2f} | "
                     f"{r['epochs_run']} ({r['best_epoch']}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml-1m", "gowalla"])
    p.add_argument("--fp-epochs", nargs="+", type=int, default=[150, 400], help="one per dataset")
    p.add_argument("--qat-epochs", nargs="+", type=int, default=[30, 12], help="one per dataset")
    p.add_argument("--data-dir")
    p.add_argument("--work-dir", default="runs/benchmarks")
    p.add_argument("--reuse-fp", action="store_true",
                   help="keep an fp checkpoint (and its recorded row) from an earlier run with the same epochs")
    args = p.parse_args()
    work = Path(args.work_dir)
    earlier = json.loads((work / "offline_accuracy.json").read_text()) if args.reuse_fp else []
    results = []
    for dataset, fp_epochs, qat_epochs in zip(args.datasets, args.fp_epochs, args.qat_epochs, strict=True):
        fp_dir = work / dataset / "fp"
        r = reused_fp(earlier, dataset, fp_epochs, fp_dir) or train(dataset, "fp", 2, fp_epochs, fp_dir, FP_FLAGS,
                                                                    args.data_dir)
        results.append({**r, "label": "fp"})
        for i, (label, method, bits, extra) in enumerate(RUNS):
            r = train(dataset, method, bits, qat_epochs, work / dataset / f"{i}-{method}-{bits}", extra,
                      args.data_dir, init=fp_dir)
            results.append({**r, "label": label})
        (work / "offline_accuracy.json").write_text(json.dumps(results, indent=2))
        epochs = ", ".join(f"{e} on {d}" for d, e in zip(args.datasets, args.qat_epochs))
        write_section("offline_accuracy", INTRO.format(qat=epochs) + table(results))


INTRO = """## Offline accuracy and size (`benchmarks/offline_accuracy.py`)

Same split, seed 2025, dim 64, 3 layers. `fp` is LightGCN with its reference objective (BPR, one
uniform negative, batch 32768, lr 1e-2); every quantized row starts from that fp checkpoint and
trains at most {qat} epochs (lr 1e-3, BPR + 1.0 x LambdaLoss over 4 negatives, batch 32768),
early-stopped on the validation split where the dataset has one (ml-1m); otherwise the last epoch is
kept. Quantized rows use the defaults (levels initialised at the mean of each interval's values, RAU
mix 0.25 for every node) unless the row says otherwise. Levels are stored in fp8 unless the row says
otherwise; metrics are computed on the stored (packed, fp8-rounded) model. Bytes = everything the
embedding table needs (codes + levels). With `--reuse-fp`, an fp row and its checkpoint come from an
earlier run with the same epochs.

"""

if __name__ == "__main__":
    main()
