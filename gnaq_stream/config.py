"""Settings as dataclasses; CLI flags and `GNAQ_*` environment variables map onto them."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import ClassVar

from gnaq_stream.errors import ConfigError
from gnaq_stream.model.gnaq import method_spec
from gnaq_stream.quant.packing import check_bits, check_level_dtype, check_row_format
from gnaq_stream.quant.quantizer import check_level_init


@dataclass(frozen=True)
class TrainConfig:
    method: str = "gnaq"
    bits: int = 2
    dim: int = 64
    n_layers: int = 3
    epochs: int = 20
    batch_size: int = 32768
    lr: float = 1e-2
    qat_lr: float = 1e-3
    level_lr: float = 0.0  # learning rate of quantization levels; 0 = qat_lr
    reg: float = 1e-4
    n_negatives: int = 4
    lambda_weight: float = 1.0
    # neighbour mix alpha * h / (h + degree): chosen on ml-1m's validation split over a flat 0.25 (h = 0)
    rau_alpha: float = 0.5
    rau_half_degree: float = 10.0
    rau_every: int = 1
    level_dtype: str = "fp8"
    level_init: str = "mean"  # levels at the mean of each interval's values, or "centre" (ablation)
    eval_every: int = 1
    patience: int = 3
    fp_init: str = "spectral"  # fp from scratch: "spectral" (top singular vectors of the graph) or "normal" (std 0.1)
    valid_share: float = 0.1  # per user, carved from train for early stopping where a dataset has no valid split
    threads: int = 2
    seed: int = 2025

    def __post_init__(self) -> None:
        positive = ("dim", "n_layers", "epochs", "batch_size", "n_negatives", "rau_every", "eval_every", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.rau_alpha <= 1.0:
            raise ConfigError(f"rau_alpha must be in [0, 1], got {self.rau_alpha}")
        check_bits(self.bits)
        check_level_dtype(self.level_dtype)
        if method_spec(self.method).quantized:
            check_row_format(self.dim, self.bits, self.level_dtype)
        if self.rau_half_degree < 0:
            raise ConfigError(f"rau_half_degree must be >= 0, got {self.rau_half_degree}")
        check_level_init(self.level_init)
        if self.fp_init not in ("spectral", "normal"):
            raise ConfigError(f"fp_init must be spectral or normal, got {self.fp_init!r}")
        if not 0.0 <= self.valid_share < 1.0:
            raise ConfigError(f"valid_share must be in [0, 1), got {self.valid_share}")
        if self.lambda_weight < 0 or self.lr <= 0 or self.qat_lr <= 0 or self.reg < 0 or self.level_lr < 0:
            raise ConfigError("lambda_weight and reg must be >= 0, learning rates > 0")


def env_defaults(cls: type, prefix: str = "GNAQ_") -> dict[str, object]:
    """Values of `cls`'s fields found in the environment, e.g. GNAQ_BATCH_SIZE=16384."""
    found: dict[str, object] = {}
    for f in fields(cls):
        raw = os.environ.get(prefix + f.name.upper())
        if raw is None:
            continue
        kind = type(f.default)
        try:
            found[f.name] = kind(raw)
        except ValueError:
            raise ConfigError(f"{prefix}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
    return found


@dataclass(frozen=True)
class LearnerConfig:
    """Streaming learner: model shape for an empty start, refinement and prequential evaluation."""

    dim: int = 64
    bits: int = 2
    level_dtype: str = "fp8"
    n_layers: int = 3
    # off: on the ml-1m replay refinement never ranked better than none (docs/architecture.md)
    refine_steps: int = 0
    refine_max_events: int = 1000
    refine_lr: float = 5e-3
    refine_budget_seconds: float = 0.5
    neighbour_samples: int = 10
    n_negatives: int = 4
    lambda_weight: float = 1.0
    reg: float = 1e-4
    rau_alpha: float = 0.25  # the same RAU rule as offline; this mix measured at least as good on the replays
    rau_half_degree: float = 0.0
    # idle-time full-graph training earned per applied event, in training pairs: a budget in work, so
    # that how much the learner learns does not depend on how fast the rest of its path is
    # (docs/architecture.md)
    consolidate_pairs_per_event: float = 8.0
    consolidate_max_epochs: float = 1.0  # the budget never exceeds this many passes over the graph's edges
    consolidate_lr: float = 0.01  # 0.05 cost gowalla-ts 2.4 points of Recall@20 (docs/architecture.md)
    consolidate_batch: int = 32768
    consolidate_slice_seconds: float = 1.0  # a message arriving meanwhile waits this (+ one step) at most
    # only after this long without a message: a steady stream is never delayed by consolidation
    consolidate_after_idle_seconds: float = 2.0
    prequential_sample: float = 0.02
    prequential_window: int = 5000
    # item scores per event at most, on average: bounds scoring's cost per event on any catalogue
    # (binds above 5,000 items at the default sample). At 1,000 it took ~30% of the learner's time at
    # 20,000 events/s on gowalla's 41k items, and the learner fell behind (docs/benchmarks.md,
    # "Freshness"); 100 is ~0.5 us an event, ~5% of the rest of its work
    prequential_max_scores: int = 100
    # existing users' served rows follow their events within about this (docs/benchmarks.md, "Freshness")
    refresh_seconds: float = 1.0
    refresh_max_share: float = 0.25  # of wall time: a slower propagation (+ publication) runs less often
    serve_bits: int = 0  # bits of the published serving rows; 0 = the model's bits
    seed: int = 2025

    HELP: ClassVar[dict[str, str]] = {
        "dim": "embedding dimension of a model started empty (a checkpoint or store sets its own)",
        "bits": "bits per code of a model started empty",
        "level_dtype": "storage dtype of quantization levels (fp32, fp16, fp8) of a model started empty",
        "n_layers": "LightGCN propagation layers of a model started empty",
        "refine_steps": "optimiser steps on each micro-batch's touched nodes (0 = no refinement)",
        "refine_max_events": "events of a micro-batch that refinement trains on (a random sample above this)",
        "refine_lr": "refinement step size",
        "refine_budget_seconds": "wall-time cap of one micro-batch's refinement (after its first step)",
        "neighbour_samples": "neighbours averaged (1 and 2 hops) to initialise a new node",
        "n_negatives": "sampled negative items per positive in refinement",
        "lambda_weight": "weight of LambdaLoss next to BPR",
        "reg": "L2 regularisation of the touched embeddings",
        "rau_alpha": "RAU neighbour mix of the code update, in [0, 1]",
        "rau_half_degree": "degree at which the neighbour mix is halved (0 = the same for every node)",
        "consolidate_pairs_per_event": "idle-time full-graph training earned per applied event, in sampled (user, "
                                       "positive) training pairs (0 = off)",
        "consolidate_max_epochs": "cap of the unspent consolidation budget, in passes over the graph's edges",
        "consolidate_lr": "learning rate of consolidation",
        "consolidate_batch": "training pairs per consolidation step",
        "consolidate_slice_seconds": "consolidation runs in slices this long; a message waits at most one slice",
        "consolidate_after_idle_seconds": "consolidate only after this long without a message",
        "prequential_sample": "share of events scored before they are learned (the accuracy gauges)",
        "prequential_window": "scored events the accuracy gauges average over",
        "prequential_max_scores": "item scores per event at most, on average: on a larger catalogue fewer events "
                                  "are scored (0 = no bound)",
        "refresh_seconds": "full-graph propagation (and serving-row publication) at most this often",
        "refresh_max_share": "share of wall time the full-graph propagation and the publication of its rows may "
                             "take: if they took t seconds, the next propagation waits at least t / share",
        "serve_bits": "bits of the published serving rows (0 = the model's bits)",
        "seed": "random seed of sampling and initialisation",
    }

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        check_row_format(self.dim, self.bits, self.level_dtype)  # bits and level dtype checked with it
        if self.serve_bits:
            check_row_format(self.dim, self.serve_bits, self.level_dtype)
        if self.refine_steps < 0 or self.refine_max_events < 1 or self.neighbour_samples < 1 or self.n_negatives < 1:
            raise ConfigError("refine_steps must be >= 0, neighbour_samples and n_negatives >= 1")
        if min(self.consolidate_pairs_per_event, self.consolidate_max_epochs, self.consolidate_after_idle_seconds) < 0 \
                or self.consolidate_lr <= 0 or self.consolidate_batch < 1 or self.consolidate_slice_seconds <= 0:
            raise ConfigError("consolidate_pairs_per_event, _max_epochs and _after_idle_seconds must be >= 0, "
                              "consolidate_lr, _batch and _slice_seconds > 0")
        if not 0.0 < self.refresh_max_share <= 1.0:
            raise ConfigError(f"refresh_max_share must be in (0, 1], got {self.refresh_max_share}")
        if not 0.0 <= self.prequential_sample <= 1.0 or self.prequential_max_scores < 0:
            raise ConfigError(f"prequential_sample must be in [0, 1] and prequential_max_scores >= 0, got "
                              f"{self.prequential_sample} and {self.prequential_max_scores}")


@dataclass(frozen=True)
class ConsumerConfig:
    """Kafka side of `gnaq-stream consume`."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "interactions"
    group: str = "gnaq-learner"
    store: str = "gnaq-store"
    checkpoint: str = ""
    dlq_topic: str = ""
    updates_topic: str = ""  # where serving rows are published; empty = not published
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    micro_batch_size: int = 5000
    max_wait_seconds: float = 0.5
    max_message_bytes: int = 4096
    max_events: int = 0
    idle_exit: float = 0.0
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    fetch_max_bytes: int = 8 * 1024 * 1024
    start_offset: str = "earliest"  # where a partition the store has never read starts: earliest or latest
    max_nodes: int = 10_000_000  # per kind: events that would add more users (items) go to the DLQ; 0 = no limit
    exclusive_wait_seconds: float = 30.0  # for ownership of every partition before giving up (another learner)
    metadata_max_age_ms: int = 30000  # how soon partitions added to the topic are noticed
    replication_factor: int = 1  # of the topics the learner creates (dead-letter, updates)
    max_batch_inflated_bytes: int = 64 * 1024 * 1024  # a compressed record batch may inflate to this at most
    # the store's graph snapshot is renewed once the log since it holds max(this, edges / 4) events:
    # a restart then replays at most a quarter of the graph in events, and snapshots cost O(1) per event
    snapshot_min_events: int = 1_000_000

    HELP: ClassVar[dict[str, str]] = {
        "bootstrap_servers": "Kafka brokers, host:port[,host:port...]",
        "topic": "topic of interaction events",
        "group": "consumer group (one learner per group and topic; a second is refused)",
        "store": "RocksDB directory of the model, graph and offsets (created if missing)",
        "checkpoint": "offline checkpoint to start from when the store is empty",
        "dlq_topic": "dead-letter topic for messages that fail validation (empty: <topic>-dlq; created if missing)",
        "updates_topic": "topic of serving rows for replicas (empty = none; created compacted with one partition)",
        "metrics_port": "port of the Prometheus /metrics page (0 = none)",
        "metrics_host": "address the metrics page binds to",
        "micro_batch_size": "messages per micro-batch at most",
        "max_wait_seconds": "a micro-batch is processed at the latest this long after its first message",
        "max_message_bytes": "larger messages (or keys) go to the dead-letter topic as too_large",
        "max_events": "stop after this many messages (0 = run until stopped)",
        "idle_exit": "stop after this many seconds without a message, counted once all partitions are owned "
                     "(0 = never)",
        "session_timeout_ms": "Kafka group session timeout",
        "heartbeat_interval_ms": "Kafka group heartbeat interval",
        "fetch_max_bytes": "bytes fetched per request at most (bounds memory)",
        "start_offset": "where a partition the store has never read starts: earliest or latest (logged)",
        "max_nodes": "users (and items) at most; events that would add more go to the dead-letter topic as "
                     "node_limit (0 = no limit)",
        "exclusive_wait_seconds": "how long to wait to own every partition before giving up (another learner)",
        "metadata_max_age_ms": "topic metadata refresh: how soon added partitions are read",
        "replication_factor": "replication factor of the topics the learner creates",
        "max_batch_inflated_bytes": "a compressed record batch inflating beyond this (a compression bomb) goes to "
                                    "the dead-letter topic as one 'undecodable' record naming its offsets",
        "snapshot_min_events": "the store's graph snapshot is renewed once the events logged since it reach this "
                               "and a quarter of the number of edges (bounds restart time)",
    }

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.max_wait_seconds <= 0 or self.max_message_bytes < 64:
            raise ConfigError("micro_batch_size >= 1, max_wait_seconds > 0, max_message_bytes >= 64 required")
        if self.start_offset not in ("earliest", "latest"):
            raise ConfigError(f"start_offset must be earliest or latest, got {self.start_offset!r}")
        if self.max_nodes < 0 or self.exclusive_wait_seconds <= 0 or self.metadata_max_age_ms < 100 \
                or self.replication_factor < 1 or self.max_batch_inflated_bytes < self.fetch_max_bytes \
                or self.snapshot_min_events < 1:
            raise ConfigError("max_nodes >= 0, exclusive_wait_seconds > 0, metadata_max_age_ms >= 100, "
                              "replication_factor >= 1, max_batch_inflated_bytes >= fetch_max_bytes and "
                              "snapshot_min_events >= 1 required")


@dataclass(frozen=True)
class ServeConfig:
    """`gnaq-stream serve`: one recommender replica following the embedding-updates topic."""

    bootstrap_servers: str = "127.0.0.1:9092"
    updates_topic: str = "interactions-updates"
    store: str = "gnaq-serve-store"
    group: str = ""  # consumer group of this replica; every replica reads every partition, so each
    #                  needs its own (empty: gnaq-serve-<hostname>-<port>)
    host: str = "127.0.0.1"
    port: int = 8080
    max_k: int = 1000
    session_timeout_seconds: float = 10.0
    max_nodes: int = 1 << 24  # per kind; above the learner's default --max-nodes (10M)

    HELP: ClassVar[dict[str, str]] = {
        "bootstrap_servers": "Kafka brokers, host:port[,host:port...]",
        "updates_topic": "the learner's --updates-topic",
        "max_nodes": "users (and items) this replica holds at most: update records with a larger index are "
                     "rejected (gnaq_serve_updates_rejected_total{reason=\"index\"}); keep it >= the learner's "
                     "--max-nodes",
        "store": "RocksDB directory of this replica's copy of the model (serves at once after a restart)",
        "group": "consumer group of this replica; each replica needs its own (empty: gnaq-serve-<hostname>-<port>)",
        "host": "HTTP address to bind",
        "port": "HTTP port",
        "max_k": "largest k a request may ask for",
        "session_timeout_seconds": "Kafka group session timeout",
    }

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536 or self.max_k < 1 or self.session_timeout_seconds <= 0 or self.max_nodes < 1:
            raise ConfigError("port must be in 1..65535, max_k >= 1, session_timeout_seconds > 0, max_nodes >= 1")
