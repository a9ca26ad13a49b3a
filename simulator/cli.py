"""`simulator replay --dataset NAME`: replay a dataset as an event stream through Kafka into the
streaming learner and compare it, block by block, with a static and a retrained model."""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from pathlib import Path

from gnaq_stream.cli import CliParser, add_config_flags, config_from_args
from gnaq_stream.config import TrainConfig
from gnaq_stream.errors import GnaqError
from gnaq_stream.model.gnaq import METHODS
from gnaq_stream.quant.packing import LEVEL_DTYPES, SUPPORTED_BITS
from simulator.protocol import SCENARIO_DOCS, SCENARIOS

# the learner keeps node-wise levels and codes with no activation: the base model must be the same kind
STREAMABLE_METHODS = [name for name, spec in METHODS.items() if spec.quantized and not spec.tanh]


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="simulator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CliParser)
    r = sub.add_parser("replay", help="replay a dataset through Kafka: static vs retrain vs stream, per block")
    r.add_argument("--dataset", required=True)
    r.add_argument("--out", help="report folder (default: runs/simulator/DATASET-SCENARIO)")
    r.add_argument("--bootstrap-servers", help="use this Kafka cluster instead of starting an embedded broker")
    r.add_argument("--rate", type=float, default=0.0, help="events per second to produce; 0 = as fast as possible")
    r.add_argument("--scenario", choices=SCENARIOS, default="none",
                   help="; ".join(f"{name}: {doc}" for name, doc in SCENARIO_DOCS.items()).replace("%", "%%"))
    r.add_argument("--base-fraction", type=float, default=0.6, help="share of events in the base block")
    r.add_argument("--block-fraction", type=float, default=0.1, help="share of events per block")
    r.add_argument("--data-dir", help="folder holding the dataset folders (default: $GNAQ_DATA_DIR or ../shared/data)")
    add_config_flags(r, TrainConfig, choices={"method": STREAMABLE_METHODS, "level_dtype": list(LEVEL_DTYPES)},
                      helps={"bits": f"bits per code, one of {SUPPORTED_BITS}",
                             "seed": "seed of training, of the interleaved order and of the scenarios"})
    return parser


def cmd_replay(args: argparse.Namespace) -> None:
    from gnaq_stream.data.datasets import load_dataset, resolve_name
    from simulator.protocol import build_replay
    from simulator.replay import ReplayOptions, run_replay
    from simulator.report import write_report

    if args.rate < 0:
        raise GnaqError(f"--rate must be >= 0, got {args.rate}")
    cfg = config_from_args(TrainConfig, args)
    started = time.perf_counter()
    data = load_dataset(args.dataset, args.data_dir)
    replay = build_replay(data, args.scenario, args.base_fraction, args.block_fraction, cfg.seed)
    prepare_seconds = time.perf_counter() - started
    out = Path(args.out or f"runs/simulator/{resolve_name(args.dataset)}-{args.scenario}")
    report = run_replay(replay, cfg, ReplayOptions(out, args.bootstrap_servers, args.rate))
    report = write_report({**report, "timings": {"prepare_seconds": prepare_seconds, **report["timings"]}}, out)
    summary = report["summary"]
    print(f"report: {out / 'report.md'}")
    for model, recall in summary["avg_recall@20"].items():
        print(f"{model:>8}: average Recall@20 {recall:.4f}, update {summary['update_seconds'][model]:.1f} s")


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt  # SIGTERM gets the same clean shutdown as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        cmd_replay(args)
    except GnaqError as exc:
        print(f"simulator: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("simulator: interrupted; broker and learner stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
