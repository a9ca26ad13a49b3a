"""Where a streaming event's time goes: the learner's stages, next to kafka-python's own cost.

1. Starts a Kafka-protocol broker (as benchmarks/stream_throughput.py does), produces the dataset's
   test-split events and measures the raw kafka-python consume rate (best of 3 passes): its inverse
   is what fetching and decoding one record costs, the floor of any kafka-python consumer.
2. Reads the same records into memory and feeds them, micro-batch by micro-batch, to the consumer's
   micro-batch pipeline (`MicroBatchPipeline.process`, no broker in the loop), timing each stage: validation and bookkeeping,
   prequential scoring, adding the events to the graph, refinement, the store write, and the time
   Python's cyclic GC takes within them.

At 50% of the ceiling a learner has, per event, the decode cost once for decoding and once for
everything else; the table shows how the rest compares with that budget.

    python benchmarks/learner_breakdown.py --dataset gowalla --checkpoint runs/benchmarks/gowalla/0-gnaq-2
"""

from __future__ import annotations

import argparse
import functools
import gc
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402
from stream_throughput import events_of, produce, raw_ceiling, start_broker  # noqa: E402

from gnaq_stream.checkpoint import load_checkpoint  # noqa: E402
from gnaq_stream.config import ConsumerConfig, LearnerConfig  # noqa: E402
from gnaq_stream.store.embedding_store import EmbeddingStore  # noqa: E402
from gnaq_stream.stream.learner import StreamLearner  # noqa: E402
from gnaq_stream.stream.pipeline import MicroBatchPipeline  # noqa: E402
from gnaq_stream.stream.prequential import PrequentialEvaluator  # noqa: E402

STAGES = {  # stage -> (class, method); apply_micro_batch's own share is apply minus refine
    "prequential scoring": (PrequentialEvaluator, "score"),
    "graph: add events, new nodes": (StreamLearner, "apply_micro_batch"),
    "refinement": (StreamLearner, "_refine"),
    "store write (one WriteBatch)": (EmbeddingStore, "write"),
}


def read_all(bootstrap: str, topic: str, n: int) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                             max_poll_records=5000)
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records: list = []
    while len(records) < n:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def timed_stages() -> Counter:
    """Wrap each stage's method with a timer (undone by `untimed_stages`); seconds per stage."""
    spent: Counter = Counter()
    for label, (cls, name) in STAGES.items():
        method = getattr(cls, name)

        def wrapper(*args, _method=method, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - start

        setattr(cls, name, functools.wraps(method)(wrapper))
    return spent


def untimed_stages() -> None:
    for cls, name in STAGES.values():
        setattr(cls, name, getattr(cls, name).__wrapped__)


def learner_stages(records: list, checkpoint: str, batch: int, store: Path) -> dict[str, float]:
    """Microseconds per event of each stage, feeding `records` to a fresh pipeline (as the consumer does)."""
    db = EmbeddingStore(store)
    learner = StreamLearner.from_checkpoint(load_checkpoint(checkpoint), LearnerConfig(refine_steps=1))  # every stage timed
    db.write(learner.initial_changes())
    gc.freeze()  # as the consumer does once its model is loaded
    pipeline = MicroBatchPipeline(learner, db)
    pipeline.process(records[:batch])  # warm-up: first propagation, numba and torch start-up
    pipeline.metrics.time_gc()  # as `gnaq-stream consume` does

    def gc_seconds() -> float:
        return pipeline.metrics.registry.get_sample_value("gnaq_gc_seconds_total")

    spent = timed_stages()
    gc_before, start = gc_seconds(), time.perf_counter()
    for s in range(batch, len(records), batch):
        pipeline.process(records[s:s + batch])
    total, gc_spent = time.perf_counter() - start, gc_seconds() - gc_before
    untimed_stages()
    pipeline.close()
    db.close()
    n = len(records) - batch
    spent["graph: add events, new nodes"] -= spent["refinement"]
    rows = {label: spent[label] / n * 1e6 for label in STAGES}
    rows["validation, offsets, metrics, the rest"] = (total - sum(spent.values())) / n * 1e6
    rows["learner, all stages"] = total / n * 1e6
    rows["of which Python's cyclic GC"] = gc_spent / n * 1e6
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--checkpoint", required=True, help="offline checkpoint trained on the dataset's train split")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--micro-batch-size", type=int, default=ConsumerConfig.micro_batch_size)
    p.add_argument("--data-dir")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gnaq-breakdown-"))
    broker, bootstrap = start_broker(work)
    try:
        values = events_of(args.dataset, args.data_dir, seed=7)[:args.events]
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic("events", 1, 1)])
        admin.close()
        produce(bootstrap, "events", values)
        ceiling = max(raw_ceiling(bootstrap, "events", len(values)) for _ in range(3))
        records = read_all(bootstrap, "events", len(values))
    finally:
        broker.terminate()
        broker.wait(30)
    try:
        stages = learner_stages(records, args.checkpoint, args.micro_batch_size, work / "store")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"dataset": args.dataset, "events": len(records) - args.micro_batch_size, "batch": args.micro_batch_size,
              "ceiling": ceiling, "stages": stages}
    print(result, flush=True)
    write_section("learner_breakdown", report(result))


def report(r: dict) -> str:
    decode = 1e6 / r["ceiling"]
    table = "\n".join(f"| {label} | {us:.2f} µs |" for label, us in r["stages"].items())
    learner = r["stages"]["learner, all stages"]
    best = 1e6 / (decode + learner)
    return f"""## Where an event's time goes (`benchmarks/learner_breakdown.py`)

{r['events']:,} {r['dataset']} test-split events in micro-batches of {r['batch']:,}, fed from memory to the
consumer's own micro-batch pipeline (each stage timed; the Kafka commit left out), next to the raw kafka-python
consume ceiling on the same records: {r['ceiling']:,.0f} events/s (best of 3 passes), i.e.
{decode:.2f} µs per event to fetch and decode. The records are read before the loop, so the GC work
that kafka-python's allocations cause in the live consumer is not in this table (see the throughput
benchmark's GC rows).

| stage | per event |
|---|---|
{table}

Fetch-and-decode plus learner: at most {best:,.0f} events/s in one process, {best / r['ceiling']:.0%} of the
ceiling. Reaching 50% of the ceiling needs the learner's stages to fit in the decode cost itself
({decode:.2f} µs per event): {learner / decode:.1f}x what they take.
"""


if __name__ == "__main__":
    main()
