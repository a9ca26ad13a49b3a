"""Offline accuracy and size: every quantized method against `fp-continued`, seeded.

Per dataset, a full-precision LightGCN is trained once with the project's recipe (`fp`); every
continued row (the quantized methods and `fp-continued`, the same checkpoint trained on in full
precision with the same objective, learning rate and epoch budget) starts from it, once per seed.
Everything runs through the `gnaq-stream` CLI. Early stopping reads the validation split only (the
dataset's own, or the carve `--valid-share` takes from train); the test split is read once, at the end
of each run. One Markdown table goes to docs/benchmarks.md (section `offline_accuracy`), raw results to
benchmarks/results/offline_accuracy.json (committed: the table is rebuilt from it, one dataset at a time).

    python benchmarks/offline_accuracy.py --datasets ml-1m gowalla --seeds 1 2 3
    python benchmarks/offline_accuracy.py --datasets yelp2018 --reuse-fp   # resume: only missing runs
    python benchmarks/offline_accuracy.py --datasets gowalla --reuse-fp --final-fp

`--final-fp` adds the published protocol's full-precision number: `fp` retrained on all of train (no
carve) for the epoch count the carved run chose on validation, read on test once. It is the row to
hold against published LightGCN results; the continued rows still start from, and compare with, the
carved checkpoint.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import mean_std, write_section  # noqa: E402

# dataset -> (fp epoch budget, continuation epoch budget); both early-stopped on validation
BUDGETS = {"ml-1m": (150, 30), "gowalla": (270, 12), "yelp2018": (250, 12), "amazon-book": (400, 12)}
# (label, method, bits, extra CLI flags, ablation): ablations run where --ablations names the dataset
ROWS = [
    ("fp-continued", "fp-continued", 2, [], False),
    ("gnaq", "gnaq", 2, [], False),
    ("ste", "ste", 2, [], False),
    ("gnaq-paper", "gnaq-paper", 2, [], False),
    ("gnaq", "gnaq", 1, [], False),
    ("ste", "ste", 1, [], False),
    ("gnaq-paper", "gnaq-paper", 1, [], False),
    ("no-rau", "no-rau", 2, [], True),
    ("no-dqs", "no-dqs", 2, [], True),
    ("no-lambda", "no-lambda", 2, [], True),
    ("gnaq, flat RAU mix 0.25 (h 0)", "gnaq", 2, ["--rau-alpha", "0.25", "--rau-half-degree", "0"], True),
    ("gnaq, levels at interval centres", "gnaq", 2, ["--level-init", "centre"], True),
    ("gnaq, fp16 levels", "gnaq", 2, ["--level-dtype", "fp16"], True),
]
FINAL = "fp, all of train (final)"
METRICS = ("valid_recall@20", "recall@10", "recall@20", "ndcg@10", "ndcg@20")


def train(dataset: str, method: str, bits: int, epochs: int, seed: int, out: Path, extra: list[str],
          data_dir: str | None, init: Path | None = None) -> dict:
    cmd = ["gnaq-stream", "train", "--dataset", dataset, "--method", method, "--bits", str(bits),
           "--epochs", str(epochs), "--seed", str(seed), "--out", str(out), "--json", *extra]
    if init is not None:
        cmd += ["--init", str(init)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    print("$", " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cpu_minutes"] = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60
    print({k: result.get(k) for k in (*METRICS, "epochs_run", "cpu_minutes")}, flush=True)
    return result


def table(results: list[dict]) -> str:
    """One line per (dataset, label, bits): mean ± sample std over its seeds."""
    lines = ["| dataset | method | bits | seeds | valid R@20 | R@10 | R@20 | NDCG@10 | NDCG@20 | R@20 / fp-continued "
             "| bytes | compression | CPU min | epochs (best) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    first = {d: i for i, d in enumerate(dict.fromkeys(r["dataset"] for r in results))}
    for r in sorted(results, key=lambda r: first[r["dataset"]]):  # a resumed dataset's rows stay together
        groups.setdefault((r["dataset"], r["label"], r["bits"]), []).append(r)
    reference = {d: statistics.mean(x["recall@20"] for x in rs)
                 for (d, label, _), rs in groups.items() if label == "fp-continued"}
    for (dataset, label, bits), rs in groups.items():
        cells = [mean_std([r.get(m, float("nan")) for r in rs]) for m in METRICS]
        ratio = mean_std([r["recall@20"] / reference[dataset] * 100 for r in rs], ".1f") + "%" \
            if dataset in reference else "–"
        epochs = ", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in rs)
        lines.append(f"| {dataset} | {label} | {bits if bits is not None else 32} | {len(rs)} | {' | '.join(cells)} "
                     f"| {ratio} | {rs[0]['bytes_model']:,} | {rs[0]['compression']:.1f}x "
                     f"| {mean_std([r['cpu_minutes'] for r in rs], '.1f')} | {epochs} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml-1m", "gowalla"], choices=sorted(BUDGETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--ablations", nargs="*", default=["ml-1m", "gowalla"], help="datasets that get the ablation rows")
    p.add_argument("--data-dir")
    p.add_argument("--work-dir", default="runs/benchmarks")
    p.add_argument("--results", default=str(Path(__file__).parent / "results" / "offline_accuracy.json"))
    p.add_argument("--reuse-fp", action="store_true",
                   help="keep each dataset's fp checkpoint and every run already measured from it; run only missing ones")
    p.add_argument("--fp-only", action="store_true", help="train only the fp rows (continue them later with --reuse-fp)")
    p.add_argument("--final-fp", action="store_true",
                   help="also retrain fp on all of train for the epochs the carved run chose (the published protocol)")
    args = p.parse_args()
    work, raw = Path(args.work_dir), Path(args.results)
    # rows of other datasets are kept, so that one dataset at a time builds up the table
    results = json.loads(raw.read_text()) if raw.exists() else []
    for dataset in args.datasets:
        fp_epochs, epochs = BUDGETS[dataset]
        fp_dir = work / dataset / "fp"
        if args.reuse_fp and any(r["dataset"] == dataset and r["label"] == "fp" for r in results) \
                and (fp_dir / "model.json").exists():
            print(f"reusing {fp_dir} and the runs continued from it", flush=True)
        else:
            results = [r for r in results if r["dataset"] != dataset]
            # validation every 5 epochs: a full-precision epoch is short next to a full ranking
            results.append({**train(dataset, "fp", 2, fp_epochs, 2025, fp_dir, ["--eval-every", "5"], args.data_dir),
                            "label": "fp", "seed": 2025})
            record(results, raw, len(args.seeds))
        for label, method, bits, extra, ablation in ROWS:
            if args.fp_only or (ablation and dataset not in args.ablations):
                continue
            for seed in args.seeds:
                # a full-precision run reports bits None
                if any(r["dataset"] == dataset and r["label"] == label and (r["bits"] or bits) == bits
                       and r["seed"] == seed for r in results):
                    continue
                out = work / dataset / f"{method}-{bits}-{len(results)}-seed{seed}"
                r = train(dataset, method, bits, epochs, seed, out, extra, args.data_dir, init=fp_dir)
                results.append({**r, "label": label, "seed": seed})
                record(results, raw, len(args.seeds))
        if args.final_fp and not any(r["dataset"] == dataset and r["label"] == FINAL for r in results):
            fp = next(r for r in results if r["dataset"] == dataset and r["label"] == "fp")
            r = train(dataset, "fp", 2, fp["best_epoch"], 2025, work / dataset / "fp-final", ["--valid-share", "0"],
                      args.data_dir)
            results.append({**r, "label": FINAL, "seed": 2025})
            record(results, raw, len(args.seeds))


def record(results: list[dict], raw: Path, n_seeds: int) -> None:
    """Raw results and the table as they stand, after every run: a cut-off run keeps what it measured."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=2))
    budgets = ", ".join(f"{d}: fp {BUDGETS[d][0]}, continued {BUDGETS[d][1]}"
                        for d in dict.fromkeys(r["dataset"] for r in results))
    write_section("offline_accuracy", INTRO.format(budgets=budgets, seeds=n_seeds) + table(results))


INTRO = """## Offline accuracy and size (`benchmarks/offline_accuracy.py`)

dim 64, 3 layers. `fp` is LightGCN trained once (seed 2025) with the project's full-precision recipe
(spectral initialisation, BPR over 8 negatives, Adam lr 1e-2, batch 32768; see "Full-precision recipe").
Every other row continues that checkpoint, once per seed ({seeds} seeds; mean ± sample std): the
quantized methods and `fp-continued` (the same checkpoint trained on in full precision) share the
continuation objective (BPR + 1.0 x LambdaLoss over 4 negatives, lr 1e-3, batch 32768; `gnaq-paper`
keeps its authors' BPR over 5 negatives) and the epoch budget ({budgets}). Every run is early-stopped
on the validation split: ml-1m's own, elsewhere 10% of each user's training interactions carved from
train (seed 0), which every row then does not train on. The test split is read once per run, at its
end, with train and validation as the known graph. A difference inside the seeds' spread is a tie.
`fp, all of train (final)`: the published protocol's number, `fp` retrained (seed 2025) on the whole
train split for the epoch count its carved run chose, no early stopping, test read once; hold it
against published LightGCN results (the continued rows compare with `fp-continued`, not with it).
Quantized rows store levels in fp8 unless the row says otherwise and are evaluated as stored (packed,
rounded). Bytes = everything the embedding table needs (codes + levels). CPU min = user + system CPU
time of the run (2 threads).

"""

if __name__ == "__main__":
    main()
