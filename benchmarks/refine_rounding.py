"""Does refinement change the stored model? Rounding refined levels to nearest vs stochastically.

Refinement moves a node's levels by ~`refine_lr` per step; stored as fp8, levels of magnitude >= 1/8
are more than 2 x that apart, so rounding to nearest returned most of them unchanged. The learner
now rounds refined levels stochastically (`quant.packing.round_levels` with a generator: unbiased).
This streams a dataset's test interactions (time order, micro-batches of `--batch`) through
`StreamLearner.apply_micro_batch` from one `gnaq` checkpoint with refinement on (`refine_steps` 1; the
learner's default is off), once per rounding and seed, and reports
the mechanism (stored rows rewritten per event: rows whose bytes a batch changed; at the end,
share of levels and of codes that differ from the checkpoint's) and prequential Recall@20 / NDCG@20 (every test event
ranked before it is learned). Writes section `refine_rounding` of docs/benchmarks.md.

    python benchmarks/refine_rounding.py --dataset ml-100k --seeds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from gnaq_stream.checkpoint import load_checkpoint  # noqa: E402
from gnaq_stream.config import LearnerConfig  # noqa: E402
from gnaq_stream.data.datasets import load_dataset  # noqa: E402
from gnaq_stream.data.events import Event  # noqa: E402
from gnaq_stream.quant import packing  # noqa: E402
from gnaq_stream.stream import learner as learner_module  # noqa: E402
from gnaq_stream.stream.learner import StreamLearner  # noqa: E402
from gnaq_stream.stream.prequential import PrequentialEvaluator  # noqa: E402


def nearest(levels: torch.Tensor, level_dtype: str, generator: torch.Generator | None = None) -> torch.Tensor:
    return packing.round_levels(levels, level_dtype)


def run(ckpt, events: list[Event], rounding: str, seed: int, batch: int) -> dict:
    learner_module.round_levels = nearest if rounding == "nearest" else packing.round_levels
    # a full propagation before every batch, so each event is ranked by the model refined so far
    cfg = LearnerConfig(seed=seed, refine_steps=1, consolidate_pairs_per_event=0.0, refresh_seconds=0.0,
                        refresh_max_share=1.0)
    learner = StreamLearner.from_checkpoint(ckpt, cfg)
    tables = (learner.users, learner.items)
    start = [t.levels_codes(np.arange(t.n)) for t in tables]
    prequential = PrequentialEvaluator(window=len(events), sample=1.0, seed=seed)
    changed = 0
    for s in range(0, len(events), batch):
        part = events[s:s + batch]
        prequential.score(learner, part)
        result = learner.apply_micro_batch(part)
        changed += len(result.changed_users) + len(result.changed_items)  # rows whose stored bytes changed
    end = [t.levels_codes(np.arange(len(l0))) for t, (l0, _) in zip(tables, start)]
    levels = np.mean([(l1 != l0).float().mean().item() for (l1, _), (l0, _) in zip(end, start)])
    codes = np.mean([(c1 != c0).float().mean().item() for (_, c1), (_, c0) in zip(end, start)])
    acc = prequential.metrics()
    return {"rounding": rounding, "seed": seed, "rows_per_event": changed / len(events), "levels_changed": levels,
            "codes_changed": codes, "recall@20": acc["recall@20"], "ndcg@20": acc["ndcg@20"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data-dir")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--checkpoint", default="runs/refine-rounding/gnaq")
    args = p.parse_args()
    torch.set_num_threads(2)
    ckpt_dir = Path(args.checkpoint)
    if not (ckpt_dir / "model.json").exists():
        subprocess.run(["gnaq-stream", "train", "--dataset", args.dataset, "--method", "gnaq", "--out", str(ckpt_dir),
                        *(["--data-dir", args.data_dir] if args.data_dir else [])], check=True)
    ckpt = load_checkpoint(ckpt_dir)
    data = load_dataset(args.dataset, args.data_dir)
    order = np.argsort(data.test.ts, kind="stable") if data.test.ts is not None else np.arange(len(data.test))
    events = [Event(str(u), str(i), float(k)) for k, (u, i) in
              enumerate(zip(data.test.users[order].tolist(), data.test.items[order].tolist()))]
    rows = [run(ckpt, events, rounding, seed, args.batch) for rounding in ("nearest", "stochastic")
            for seed in range(args.seeds)]
    for row in rows:
        print(json.dumps(row), flush=True)
    write_section("refine_rounding", report(args, rows, len(events)))


def report(args, rows: list[dict], n_events: int) -> str:
    def cell(variant: str, key: str, scale: float = 1.0, digits: int = 4) -> str:
        values = np.array([r[key] for r in rows if r["rounding"] == variant]) * scale
        return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"

    lines = ["## Refinement that changes the stored model (`benchmarks/refine_rounding.py`)\n",
             f"{args.dataset}: its {n_events:,} test interactions streamed in time order (micro-batches of "
             f"{args.batch}) through `apply_micro_batch` from one `gnaq` checkpoint (2 bits, fp8 levels), "
             "refinement on (one step per batch), no consolidation, a full propagation before every batch; mean ± "
             f"std over {args.seeds} seeds. Recall/NDCG: every event ranked before it is learned, by the model "
             "refined so far.\n",
             "| levels rounded | stored rows rewritten per event | levels changed at the end (%) | "
             "codes changed at the end (%) | Recall@20 | NDCG@20 |", "|---|---|---|---|---|---|"]
    for variant in ("nearest", "stochastic"):
        lines.append(f"| {variant} | {cell(variant, 'rows_per_event', digits=3)} | "
                     f"{cell(variant, 'levels_changed', 100, 2)} | {cell(variant, 'codes_changed', 100, 2)} | "
                     f"{cell(variant, 'recall@20')} | {cell(variant, 'ndcg@20')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
