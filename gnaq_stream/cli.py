"""`gnaq-stream` command line: train, evaluate, consume, serve, store."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from gnaq_stream.config import ConsumerConfig, LearnerConfig, ServeConfig, TrainConfig, env_defaults
from gnaq_stream.errors import GnaqError
from gnaq_stream.model.gnaq import METHODS
from gnaq_stream.quant.packing import LEVEL_DTYPES, SUPPORTED_BITS


class CliParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder holding the dataset folders (default: $GNAQ_DATA_DIR or ../shared/data)")


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="gnaq-stream", description="Quantized graph collaborative filtering, offline and streaming.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CliParser)

    t = sub.add_parser("train", help="train a model on a dataset's train split and evaluate it on its test split")
    t.add_argument("--dataset", required=True)
    add_config_flags(t, TrainConfig, choices={"method": list(METHODS), "level_dtype": list(LEVEL_DTYPES)},
                      helps={"bits": f"bits per code, one of {SUPPORTED_BITS}"})
    t.add_argument("--init", help="checkpoint whose embeddings initialise the quantizer (quantized methods)")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--json", action="store_true", help="print one JSON object as the last line; no progress bars")
    _add_data_dir(t)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset's test split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--json", action="store_true")
    _add_data_dir(e)

    c = sub.add_parser("consume", help="run the streaming learner on a Kafka topic of interaction events")
    add_config_flags(c, ConsumerConfig, required=("bootstrap_servers", "topic", "group", "store"))
    add_config_flags(c, LearnerConfig)
    c.add_argument("--log-level", default="INFO")

    v = sub.add_parser("serve", help="run a recommender replica: follows the embedding-updates topic, "
                                     "answers GET /recommend/{user}?k=N")
    add_config_flags(v, ServeConfig)
    v.add_argument("--log-level", default="WARNING")

    s = sub.add_parser("store", help="look into an embedding store")
    store_sub = s.add_subparsers(dest="store_command", required=True, parser_class=CliParser)
    i = store_sub.add_parser("inspect", help="node counts, bytes, compression, offsets and model version")
    i.add_argument("--store", required=True)
    i.add_argument("--json", action="store_true")
    return parser


def add_config_flags(p: argparse.ArgumentParser, cls: type, required: tuple[str, ...] = (),
                      choices: dict[str, list[str]] | None = None, helps: dict[str, str] | None = None) -> None:
    """One flag per dataclass field; defaults from GNAQ_<FIELD> environment variables."""
    env = env_defaults(cls)
    described = {**getattr(cls, "HELP", {}), **(helps or {})}
    for f in fields(cls):
        default = env.get(f.name, f.default)
        text = described.get(f.name, "")
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=default,
                       required=f.name in required and f.name not in env, choices=(choices or {}).get(f.name),
                       help=f"{text} (default: %(default)r; env GNAQ_{f.name.upper()})".lstrip())


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")


def _size_fields(model) -> dict:
    size = model.size()
    return {"bytes_model": size.bytes_model, "bytes_fp32": size.bytes_fp32, "compression": size.compression,
            "bytes_per_node": size.bytes_per_node}


def cmd_train(args: argparse.Namespace) -> None:
    from gnaq_stream.checkpoint import load_checkpoint, save_checkpoint
    from gnaq_stream.data.datasets import load_dataset, resolve_name
    from gnaq_stream.train.trainer import train

    cfg = config_from_args(TrainConfig, args)
    data = load_dataset(args.dataset, args.data_dir)
    init = load_checkpoint(args.init).layer0() if args.init else None
    result = train(data, cfg, init=init, progress=not args.json)
    result.model.extra = {"dataset": resolve_name(args.dataset), "train_config": cfg.__dict__,
                          "metrics": result.metrics}
    save_checkpoint(result.model, args.out)
    _report({"dataset": resolve_name(args.dataset), "method": cfg.method,
             "bits": result.model.bits, **result.metrics, **_size_fields(result.model),
             "train_seconds": result.train_seconds, "seconds_per_epoch": result.seconds_per_epoch,
             "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "checkpoint": str(Path(args.out))},
            args.json)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from gnaq_stream.checkpoint import load_checkpoint
    from gnaq_stream.data.datasets import load_dataset, resolve_name
    from gnaq_stream.errors import CheckpointError
    from gnaq_stream.train.trainer import evaluate_stored

    model = load_checkpoint(args.checkpoint)
    data = load_dataset(args.dataset, args.data_dir)
    if (model.n_users, model.n_items) != (data.n_users, data.n_items):
        raise CheckpointError(f"{args.checkpoint}: has {model.n_users} users x {model.n_items} items, "
                              f"dataset {args.dataset!r} has {data.n_users} x {data.n_items}")
    metrics = evaluate_stored(model, data, "test", progress=not args.json)
    _report({"dataset": resolve_name(args.dataset), "method": model.method, "bits": model.bits, **metrics,
             **_size_fields(model), "train_seconds": model.extra.get("train_seconds", 0.0)}, args.json)


def config_from_args(cls: type, args: argparse.Namespace):
    """The dataclass `cls` built from the parsed flags `add_config_flags` added."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def cmd_consume(args: argparse.Namespace) -> None:
    import logging

    from gnaq_stream.stream.consumer import StreamConsumer, install_signal_handlers

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO lines drown ours
    consumer = StreamConsumer(config_from_args(ConsumerConfig, args), config_from_args(LearnerConfig, args))
    consumer.metrics.time_gc()
    if args.metrics_port:
        consumer.metrics.serve(args.metrics_port, args.metrics_host)
    install_signal_handlers(consumer)
    consumed = consumer.run()
    logging.getLogger("gnaq_stream.consume").info("stopped after %d messages", consumed)


def cmd_serve(args: argparse.Namespace) -> None:
    from services.recommender.app import run

    run(config_from_args(ServeConfig, args), args.log_level.upper())


def cmd_store(args: argparse.Namespace) -> None:
    from gnaq_stream.store.embedding_store import inspect_store

    info = inspect_store(args.store)
    if args.json:
        print(json.dumps(info))
    else:
        _report(info, False)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "consume": cmd_consume, "serve": cmd_serve,
            "store": cmd_store}


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except GnaqError as exc:
        print(f"gnaq-stream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gnaq-stream: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
