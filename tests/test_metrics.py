import gc

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gnaq_stream.metrics import BatchHistogram, LearnerMetrics

BUCKETS = (0.005, 0.1, 1.0, 2.5)


def _lines(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_batch_histogram_exposes_what_per_value_observation_would():
    values = [0.0, 0.005, 0.0051, 0.1, 0.7, 1.0, 2.5, 2.6, 40.0]
    batched, single = CollectorRegistry(), CollectorRegistry()
    hist = BatchHistogram("x_seconds", "doc", BUCKETS, batched)
    hist.observe(np.array(values[:4]))
    hist.observe(np.array(values[4:]))
    reference = Histogram("x_seconds", "doc", buckets=BUCKETS, registry=single)
    for v in values:
        reference.observe(v)
    assert _lines(batched) == _lines(single)


def test_gc_time_is_counted():
    metrics = LearnerMetrics()
    metrics.time_gc()
    try:
        gc.collect()
    finally:
        gc.callbacks.pop()  # time_gc() registers for the life of a process; a test is not one
    assert metrics.registry.get_sample_value("gnaq_gc_seconds_total") > 0
