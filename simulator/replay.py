"""A replay, test-then-train: the base model, the broker and the learner, then every block is first
evaluated for each model and then streamed in.

Models, each as it is just before the block:
    static   the base model (trained offline on the base block), never updated
    retrain  GNAQ trained from scratch on every event before the block (block 1: the base model)
    stream   the streaming learner, read from its store once it has stored every event before the block
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gnaq_stream.checkpoint import StoredModel, save_checkpoint
from gnaq_stream.config import TrainConfig
from gnaq_stream.data.datasets import Split
from gnaq_stream.train.trainer import train
from simulator.evaluation import evaluate_block, model_embeddings, store_embeddings
from simulator.protocol import SCENARIO_DOCS, Replay
from simulator.transport import (EventProducer, Learner, admin_client, create_topic, delete_topic,
                                 start_broker)

MODELS = ("static", "retrain", "stream")
UPDATE_COST_RULE = (
    "a block's update seconds are the work that brought a model from its state at the previous block to this "
    "one: 0 for every model at block 1 and always for static; retrain: the wall time of training from scratch; "
    "stream: the learner's own wall time applying and storing the previous block's micro-batches and "
    "consolidating while idle (gnaq_micro_batch_seconds + gnaq_consolidate_seconds_total; time spent waiting "
    "for messages excluded)"
)


@dataclass(frozen=True)
class ReplayOptions:
    out: Path
    bootstrap_servers: str | None = None  # None: start an embedded broker
    rate: float = 0.0  # events/s; 0 = as fast as possible
    progress: bool = True


class _Cleanup(contextlib.ExitStack):
    """An ExitStack whose unwinding a second Ctrl-C (or SIGTERM) cannot cut short: stopping the
    children must finish, or processes would be left behind."""

    def __exit__(self, *exc) -> bool:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return super().__exit__(*exc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _train(replay: Replay, end: int, cfg: TrainConfig, progress: bool) -> tuple[StoredModel, float]:
    """GNAQ from scratch on the first `end` events; the model and the wall seconds it took."""
    start = time.perf_counter()
    model = train(replay.prefix(end), cfg, progress=progress).model
    return model, time.perf_counter() - start


def _seen(replay: Replay, end: int) -> tuple[int, int]:
    """Users and items seen in the first `end` events (replay ids are contiguous by first appearance)."""
    return int(replay.users[:end].max()) + 1, int(replay.items[:end].max()) + 1


def _row(result: dict, update_seconds: float, bytes_model: int, known: tuple[int, int]) -> dict:
    """One model's entry of a block: its metrics and misses, what it cost and weighs, what it knows."""
    metrics = {k: v for k, v in result.items() if k not in ("users", "interactions")}
    return {**metrics, "update_seconds": update_seconds, "bytes_model": bytes_model, "known_users": known[0],
            "known_items": known[1]}


def run_replay(replay: Replay, cfg: TrainConfig, opts: ReplayOptions) -> dict:
    """Run the whole replay; returns the report's content (see simulator.report)."""
    started = time.perf_counter()
    logs, store = opts.out / "logs", opts.out / "store"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(store, ignore_errors=True)  # a learner resumes from an existing store: start afresh
    topic = f"simulator-{replay.dataset}-{uuid.uuid4().hex[:8]}"
    n_base = replay.bounds[1]
    timings = {"retrain_seconds": 0.0, "evaluate_seconds": 0.0}
    blocks = []
    with _Cleanup() as stack:
        if opts.bootstrap_servers:
            admin_client(opts.bootstrap_servers).close()  # unreachable: fail now, before any training
            bootstrap, transport = opts.bootstrap_servers, f"given cluster {opts.bootstrap_servers}"
            create_topic(bootstrap, topic)
            stack.callback(delete_topic, bootstrap, topic)
        else:
            broker, bootstrap = start_broker(logs)
            stack.callback(broker.stop, 15)
            transport = f"embedded Tansu broker on {bootstrap} (memory storage)"
            create_topic(bootstrap, topic)

        base, timings["base_train_seconds"] = _train(replay, n_base, cfg, opts.progress)
        base.extra = {"dataset": replay.dataset, "replay_events": n_base, "train_config": cfg.__dict__}
        save_checkpoint(base, opts.out / "base")
        learner = Learner(bootstrap, topic, store, opts.out / "base", logs / "learner.log")
        stack.callback(learner.child.stop, 60)
        producer = EventProducer(bootstrap, topic, opts.rate)
        stack.callback(producer.close)
        n_initial = len(base.edges)  # the learner's graph starts as the base model's (unique) edges
        info = learner.wait_for_events(n_initial, opts.progress, "learner start")
        stream_start = stream_clock = learner.update_seconds(info["model_version"])

        static = retrain_emb = model_embeddings(base)
        retrain = base
        for k in tqdm(range(replay.n_blocks), desc="blocks", disable=not opts.progress):
            start, end = replay.block(k)
            info = learner.wait_for_events(n_initial + start - n_base, opts.progress, f"learner before block {k + 1}")
            clock = learner.update_seconds(info["model_version"])
            stream_update, stream_clock = clock - stream_clock, clock
            retrain_update = 0.0
            if k:
                retrain, retrain_update = _train(replay, start, cfg, opts.progress)
                retrain_emb = model_embeddings(retrain)
                timings["retrain_seconds"] += retrain_update
            t = time.perf_counter()
            history = Split(replay.users[:start], replay.items[:start])
            block = Split(replay.users[start:end], replay.items[start:end])
            results = {"static": evaluate_block(static, history, block),
                       "retrain": evaluate_block(retrain_emb, history, block),
                       "stream": evaluate_block(store_embeddings(store), history, block)}
            timings["evaluate_seconds"] += time.perf_counter() - t
            before, after = _seen(replay, start), _seen(replay, end)
            blocks.append({
                "block": k + 1, "start": start, "end": end, "events": end - start,
                "new_users": after[0] - before[0], "new_items": after[1] - before[1],
                "eval_users": results["static"]["users"], "eval_interactions": results["static"]["interactions"],
                "models": {
                    "static": _row(results["static"], 0.0, base.size().bytes_model, (base.n_users, base.n_items)),
                    "retrain": _row(results["retrain"], retrain_update, retrain.size().bytes_model,
                                    (retrain.n_users, retrain.n_items)),
                    "stream": _row(results["stream"], stream_update, info["bytes_model"],
                                   (info["users"], info["items"])),
                }})
            producer.send(replay.users[start:end], replay.items[start:end], replay.ts[start:end], start,
                          opts.progress, f"produce block {k + 1}")

        expected = n_initial + replay.n_events - n_base
        info = learner.wait_for_events(expected, opts.progress, "learner after the last block")
        clock = learner.update_seconds(info["model_version"])
    timings["stream_seconds"] = clock - stream_start
    timings["total_seconds"] = time.perf_counter() - started
    return {
        "dataset": replay.dataset,
        "order": replay.order,
        "scenario": {"name": replay.scenario, "description": SCENARIO_DOCS[replay.scenario]},
        "events": replay.n_events,
        "users": int(replay.users.max()) + 1,
        "items": int(replay.items.max()) + 1,
        "transport": transport,
        "rate": opts.rate,
        "train_config": cfg.__dict__,
        "base": {"events": n_base, "users": base.n_users, "items": base.n_items,
                 "train_seconds": timings["base_train_seconds"], "bytes_model": base.size().bytes_model},
        "blocks": blocks,
        "stream_final": {"events_in_store": info["events"], "expected_events_in_store": expected,
                         "users": info["users"], "items": info["items"], "bytes_model": info["bytes_model"],
                         "last_block_update_seconds": clock - stream_clock},
        "timings": timings,
    }
