"""The harness itself, against the real processes: Tansu, weed mini S3 and Prometheus."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry, Counter, start_http_server

from .conftest import (
    GROUP_CONSUMER_KWARGS,
    HOST,
    Broker,
    PrometheusServer,
    consume_all,
    create_topic,
    free_port,
    produce,
    wait_until,
)


@pytest.mark.parametrize("client", ["kafka-python", "aiokafka", "confluent"])
def test_produce_with_each_client_reads_back(kafka_broker: Broker, client: str) -> None:
    create_topic(kafka_broker.bootstrap, "events")
    values = [f"{client}-{i}".encode() for i in range(20)]
    produce(kafka_broker.bootstrap, "events", values, client=client, key=b"user-1")  # type: ignore[arg-type]

    records = consume_all(kafka_broker.bootstrap, "events", expected=len(values))
    assert [r.value for r in records] == values
    assert [r.offset for r in records] == list(range(len(values)))
    assert {r.key for r in records} == {b"user-1"}


def test_consume_all_spans_partitions_keeps_headers_and_exact_count(kafka_broker: Broker) -> None:
    create_topic(kafka_broker.bootstrap, "dlq", partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    try:
        for p in range(3):
            producer.send("dlq", value=f"bad-{p}".encode(), partition=p, headers=[("error", f"e{p}".encode())])
        producer.flush(10)
    finally:
        producer.close(timeout=10)

    # Asking for fewer than exist still returns all of them (the settle poll), so counts can be exact.
    records = consume_all(kafka_broker.bootstrap, "dlq", expected=2)
    assert [(r.partition, r.value, r.headers) for r in records] == [
        (p, f"bad-{p}".encode(), [("error", f"e{p}".encode())]) for p in range(3)
    ]
    with pytest.raises(AssertionError, match="got 3 of 4"):
        consume_all(kafka_broker.bootstrap, "dlq", expected=4, timeout=1)


def test_broker_stop_start_same_port(kafka_broker: Broker) -> None:
    port = kafka_broker.port
    kafka_broker.stop()
    assert not kafka_broker.running
    with socket.socket() as s:
        assert s.connect_ex((HOST, port)) != 0, "broker port still accepting after stop()"
    kafka_broker.start()
    assert kafka_broker.running and kafka_broker.port == port
    create_topic(kafka_broker.bootstrap, "after-restart")
    produce(kafka_broker.bootstrap, "after-restart", [b"x"])
    assert [r.value for r in consume_all(kafka_broker.bootstrap, "after-restart", 1)] == [b"x"]


def test_persistent_broker_keeps_records_and_group_offset(persistent_broker: Broker) -> None:
    b = persistent_broker
    tp = TopicPartition("events", 0)
    values = [f"r{i}".encode() for i in range(5)]
    create_topic(b.bootstrap, "events")
    produce(b.bootstrap, "events", values)

    # A real group member (subscribe -> JoinGroup) reads 3 records and commits offset 3.
    c = KafkaConsumer("events", bootstrap_servers=b.bootstrap, group_id="g1", enable_auto_commit=False,
                      auto_offset_reset="earliest", max_poll_records=3, **GROUP_CONSUMER_KWARGS)
    try:
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500, max_records=3 - len(got)).values():
                got.extend(r.value for r in batch)
        assert got == values[:3]
        c.commit({tp: OffsetAndMetadata(3, "", -1)})
    finally:
        c.close()

    b.stop()
    assert not b.running
    time.sleep(1)  # "down for a while"
    b.start()

    records = consume_all(b.bootstrap, "events", expected=5)
    assert [r.value for r in records] == values
    c = KafkaConsumer(bootstrap_servers=b.bootstrap, group_id="g1", enable_auto_commit=False, **GROUP_CONSUMER_KWARGS)
    try:
        c.assign([tp])
        assert c.committed(tp) == 3
        resumed: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + 15
        while len(resumed) < 2 and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                resumed.extend((r.offset, r.value) for r in batch)
        assert resumed == [(3, b"r3"), (4, b"r4")]
    finally:
        c.close()
    # Offsets continue after the restart instead of starting over.
    produce(b.bootstrap, "events", [b"r5"])
    assert [(r.offset, r.value) for r in consume_all(b.bootstrap, "events", expected=6)][-1] == (5, b"r5")


def test_prometheus_scrapes_a_counter(start_prometheus: Callable[..., PrometheusServer]) -> None:
    registry = CollectorRegistry()
    counter = Counter("harness_events", "events seen by the harness test", registry=registry)
    counter.inc(7)
    port = free_port()
    server, _thread = start_http_server(port, addr=HOST, registry=registry)
    try:
        prom = start_prometheus([f"{HOST}:{port}"], scrape_interval="1s")
        result = prom.wait_for('harness_events_total{job="gnaq"}', timeout=30)
        assert len(result) == 1 and float(result[0]["value"][1]) == 7.0
        assert result[0]["metric"]["instance"] == f"{HOST}:{port}"
        assert prom.targets_health() == ["up"]

        counter.inc(3)  # a later scrape sees the new value
        wait_until(lambda: float(prom.query("harness_events_total")[0]["value"][1]) == 10.0, 30, "counter at 10")
        assert prom.query("absent(no_such_metric)")[0]["value"][1] == "1"
    finally:
        server.shutdown()
        server.server_close()
