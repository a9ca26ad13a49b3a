"""Streaming refinement and consolidation settings compared on a replay's own blocks, in process, in one run.

Every variant starts from the base checkpoint of a finished `simulator replay` (its `base` folder),
streams the replay's events after the base block through `StreamLearner.apply_micro_batch` in
micro-batches of the consumer's default size, and scores blocks `--from-block`.. with the replay's
evaluation rule (each block before it is streamed in). Kafka and the store are left out: this
isolates what refinement and consolidation do to accuracy and what they cost. The replay's own static and retrain
numbers for the same blocks are shown alongside (same rule, from its report.json).

    python benchmarks/refinement.py --replay runs/simulator/yelp2018-none \
        --variants refine_steps=0,consolidate_pairs_per_event=0 consolidate_pairs_per_event=0 ""

With `--seeds`, every variant runs once per learner seed (sampling of refinement and consolidation)
and the table shows mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import mean_std, write_section  # noqa: E402

from gnaq_stream.checkpoint import load_checkpoint  # noqa: E402
from gnaq_stream.config import ConsumerConfig, LearnerConfig  # noqa: E402
from gnaq_stream.data.datasets import Split, load_dataset  # noqa: E402
from gnaq_stream.data.events import Event  # noqa: E402
from gnaq_stream.stream.consolidation import earned  # noqa: E402
from gnaq_stream.stream.learner import StreamLearner  # noqa: E402
from simulator.evaluation import evaluate_block, learner_embeddings  # noqa: E402
from simulator.protocol import build_replay  # noqa: E402


def parse_variant(text: str) -> dict:
    """"refine_steps=3,refine_lr=0.01" -> LearnerConfig overrides ("" = the defaults)."""
    defaults = LearnerConfig()
    out = {}
    for pair in filter(None, text.split(",")):
        name, value = pair.split("=", 1)
        out[name] = type(getattr(defaults, name))(value)
    return out


def consolidate(learner: StreamLearner, budget: float) -> float:
    """Spend a budget of `budget` training pairs the way the consumer does when idle: slices until it
    is used up; the seconds it took."""
    start, pairs = time.perf_counter(), math.ceil(budget)
    while pairs > 0:
        pairs -= learner.consolidate(pairs, learner.cfg.consolidate_slice_seconds)[1]
    return time.perf_counter() - start


def run_variant(replay, base, overrides: dict, first_scored: int, batch: int) -> dict:
    learner = StreamLearner.from_checkpoint(base, LearnerConfig(**overrides))
    recall, stream_seconds, refine_seconds, consolidate_seconds = {}, 0.0, 0.0, 0.0
    budget = 0.0
    for k in range(replay.n_blocks):
        start, end = replay.block(k)
        # between blocks the learner is idle: it consolidates with what the last block earned
        consolidate_seconds += consolidate(learner, budget)
        budget = 0.0
        if k >= first_scored:
            history = Split(replay.users[:start], replay.items[:start])
            block = Split(replay.users[start:end], replay.items[start:end])
            recall[k + 1] = evaluate_block(learner_embeddings(learner), history, block)["recall@20"]
        t = time.perf_counter()
        for at in range(start, end, batch):
            users, items = replay.users[at:min(end, at + batch)], replay.items[at:min(end, at + batch)]
            result = learner.apply_micro_batch([Event(str(u), str(i), 0.0)
                                                for u, i in zip(users.tolist(), items.tolist())])
            refine_seconds += result.refine_seconds
            budget = earned(learner.cfg, budget, len(users), learner.graph.n_edges)
        stream_seconds += time.perf_counter() - t
    return {"recall": recall, "stream_seconds": stream_seconds, "refine_seconds": refine_seconds,
            "consolidate_seconds": consolidate_seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replay", required=True, help="folder of a finished `simulator replay` (report.json, base/)")
    p.add_argument("--variants", nargs="+",
                   default=["refine_steps=0,consolidate_pairs_per_event=0", "consolidate_pairs_per_event=0", ""],
                   help="learner settings per variant: NAME=VALUE[,NAME=VALUE]; \"\" = the defaults")
    p.add_argument("--seeds", nargs="+", type=int, default=[LearnerConfig().seed], help="learner seeds per variant")
    p.add_argument("--from-block", type=int, default=3, help="first block scored (1-based)")
    p.add_argument("--base-fraction", type=float, default=0.6)
    p.add_argument("--block-fraction", type=float, default=0.1)
    p.add_argument("--data-dir")
    args = p.parse_args()
    folder = Path(args.replay)
    report = json.loads((folder / "report.json").read_text())
    data = load_dataset(report["dataset"], args.data_dir)
    replay = build_replay(data, report["scenario"]["name"], args.base_fraction, args.block_fraction,
                          report["train_config"]["seed"])
    if replay.bounds[1] != report["base"]["events"]:
        raise SystemExit(f"{folder}: base block has {report['base']['events']} events, this cut gives "
                         f"{replay.bounds[1]}; pass the replay's --base-fraction/--block-fraction")
    base = load_checkpoint(folder / "base")
    batch = ConsumerConfig().micro_batch_size
    results = []
    for text in args.variants:
        runs = []
        for seed in args.seeds:
            runs.append(run_variant(replay, base, {**parse_variant(text), "seed": seed}, args.from_block - 1, batch))
            print(text or "(defaults)", seed, runs[-1], flush=True)
        results.append({"variant": text or "defaults", "runs": runs})
    scored = sorted(results[0]["runs"][0]["recall"])
    reference = {b["block"]: b["models"] for b in report["blocks"]}
    lines = ["| learner settings | " + " | ".join(f"block {b} R@20" for b in scored)
             + " | mean / retrain's | streaming s | of which refinement s | consolidation s |",
             "|---|" + "---|" * (len(scored) + 4)]
    for name in ("static", "retrain"):
        values = [reference[b][name]["recall@20"] for b in scored]
        lines.append(f"| replay's {name} | " + " | ".join(f"{v:.4f}" for v in values) + " | | | | |")
    retrain_mean = np.mean([reference[b]["retrain"]["recall@20"] for b in scored])
    for r in results:
        cells = [mean_std([run["recall"][b] for run in r["runs"]], ".4f") for b in scored]
        share = mean_std([np.mean([run["recall"][b] for b in scored]) / retrain_mean * 100 for run in r["runs"]], ".1f")
        seconds = " | ".join(mean_std([run[k] for run in r["runs"]], ".1f")
                             for k in ("stream_seconds", "refine_seconds", "consolidate_seconds"))
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {share}% | {seconds} |")
    seeds = f"mean ± std over learner seeds {args.seeds}" if len(args.seeds) > 1 else f"learner seed {args.seeds[0]}"
    body = f"""## Streaming refinement and consolidation (`benchmarks/refinement.py`, {report['dataset']})

In process, from the base checkpoint of `{folder}` ({report['dataset']}, scenario
{report['scenario']['name']}): every variant streams the same {replay.n_events - replay.bounds[1]:,} events after the
base block in micro-batches of {batch:,}; blocks {scored[0]}..{scored[-1]} are scored before they are
streamed in (the replay's rule), with the replay's static and retrain rows for the same blocks.
`refine_steps=0` = graph and new nodes only, no refinement; `consolidate_pairs_per_event=0` = no
idle-time consolidation. Consolidation runs between blocks (where the learner would be idle),
spending the training pairs the previous block earned (`consolidate_pairs_per_event` per event), as
the consumer does. Learner rows: {seeds}.

""" + "\n".join(lines)
    write_section(f"refinement_{report['dataset']}", body)


if __name__ == "__main__":
    main()
