"""Compressed record batches: every codec reaches the learner and the replica; bounded decompression.

The first tests need no broker: gnaq_stream.kafka_codecs' decoders on their own and inside
kafka-python's record batches. The rest run against the real broker of the integration fixtures.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
from collections.abc import Callable

import aiokafka.codec
import kafka.codec
import kafka.record.default_records
import kafka.record.legacy_records
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import Fetcher
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.structs import TopicPartition

from gnaq_stream.kafka_codecs import (CODECS, DEFAULT_MAX_DECOMPRESSED_BYTES, DecompressionError,
                                      DecompressionLimitError, decompress, install_bounded_decoders)
from gnaq_stream.store.embedding_store import inspect_store

from .conftest import consume_all, create_topic, wait_until
from .test_consume import consume_cmd, encode, ml100k_events
from .test_serve import Replica

MIB = 1024 * 1024
PAYLOAD = b"".join(json.dumps({"user": k, "item": k % 97, "ts": 1700000000 + k}).encode() for k in range(3000))
CODEC_IDS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}  # the record batch attribute


def encoders(codec: str) -> dict[str, Callable[[bytes], bytes]]:
    """The producers' encoders of `codec`: kafka-python's (the learner's) and aiokafka's (the replica's)."""
    found = {"kafka-python": getattr(kafka.codec, f"{codec}_encode"),
             "aiokafka": getattr(aiokafka.codec, f"{codec}_encode")}
    if codec == "snappy":  # raw snappy, not the xerial framing both clients write by default
        found["raw"] = lambda payload: kafka.codec.snappy_encode(payload, xerial_compatible=False)
    return found


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips(codec):
    for client, encode_payload in encoders(codec).items():
        compressed = encode_payload(PAYLOAD)
        assert decompress(codec, compressed) == PAYLOAD, client
        assert decompress(codec, compressed, max_bytes=len(PAYLOAD)) == PAYLOAD, client  # exactly at the limit
        with pytest.raises(DecompressionLimitError):
            decompress(codec, compressed, max_bytes=len(PAYLOAD) - 1)


@pytest.mark.parametrize("codec", CODECS)
def test_zeros_stop_at_the_limit(codec):
    compressed = getattr(kafka.codec, f"{codec}_encode")(bytes(16 * MIB))
    assert len(compressed) < MIB
    with pytest.raises(DecompressionLimitError, match=f"beyond {MIB} bytes"):
        decompress(codec, compressed, max_bytes=MIB)


def test_gzip_members_are_all_read():
    # kafka-python's gzip decoder reads concatenated gzip members; the bounded one must too
    assert decompress("gzip", gzip.compress(b"ab") + gzip.compress(b"cd")) == b"abcd"


def test_a_raw_snappy_block_is_refused_by_its_stated_length():
    # one raw snappy block is inflated whole: its header (16 MiB) is checked before any byte is
    block = kafka.codec.snappy_encode(bytes(16 * MIB), xerial_compatible=False)
    with pytest.raises(DecompressionLimitError, match="snappy block"):
        decompress("snappy", block, max_bytes=MIB)


@pytest.mark.parametrize("codec", CODECS)
def test_corrupt_payloads_raise_decompression_error(codec):
    good = getattr(kafka.codec, f"{codec}_encode")(PAYLOAD)
    for bad in (b"garbage, not compressed at all", good[: len(good) // 2]):
        try:
            result = decompress(codec, bad)
        except DecompressionError as exc:
            assert not isinstance(exc, DecompressionLimitError), exc
        else:  # zstd's stream reader, like kafka-python's decoder, returns what a truncated frame holds
            assert codec == "zstd" and PAYLOAD.startswith(result)


GZIP_BOMB_IN_A_CHILD = r"""
import re, sys, zlib
from pathlib import Path
import kafka.codec
from gnaq_stream.kafka_codecs import DecompressionLimitError, install_bounded_decoders

def peak_mib():  # VmHWM, not getrusage: ru_maxrss carries the forking parent's peak across exec
    return int(re.search(r"VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text())[1]) // 1024

mib, limit = int(sys.argv[1]), int(sys.argv[2])
packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip stream of `mib` MiB of zeros, built in ~1 MiB of memory
bomb = b"".join([packer.compress(bytes(1 << 20)) for _ in range(mib)] + [packer.flush()])
if limit:
    install_bounded_decoders(limit)
before = peak_mib()
try:
    outcome = len(bytearray(kafka.codec.gzip_decode(bomb)))  # what DefaultRecordBatch does with the result
except DecompressionLimitError:
    outcome = "DecompressionLimitError"
print(len(bomb), outcome, peak_mib() - before)
"""


def gzip_bomb_peak(mib: int, limit: int) -> tuple[int, str, int]:
    """Inflate a gzip bomb of `mib` MiB of zeros in a fresh Python through kafka.codec.gzip_decode,
    bounded at `limit` bytes (0: kafka-python's own decoder): (compressed bytes, outcome, peak RSS growth MiB)."""
    proc = subprocess.run([sys.executable, "-c", GZIP_BOMB_IN_A_CHILD, str(mib), str(limit)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, outcome, growth = proc.stdout.split()
    return int(size), outcome, int(growth)


def test_a_gzip_bomb_raises_with_memory_bounded_by_the_limit():
    size, outcome, growth = gzip_bomb_peak(200, DEFAULT_MAX_DECOMPRESSED_BYTES)
    assert size < MIB and outcome == "DecompressionLimitError"
    # kafka-python's own decoder grows by ~400 MiB here (the 200 MiB and DefaultRecordBatch's copy)
    assert growth < DEFAULT_MAX_DECOMPRESSED_BYTES // MIB + 32, growth


@pytest.fixture
def bounded(monkeypatch):
    """install_bounded_decoders(1 MiB) in this process for one test; kafka-python's own code is back after."""
    for module in (kafka.codec, kafka.record.default_records, kafka.record.legacy_records):
        for codec in CODECS:
            if hasattr(module, f"{codec}_decode"):
                monkeypatch.setattr(module, f"{codec}_decode", getattr(module, f"{codec}_decode"))
    monkeypatch.setattr(DefaultRecordBatch, "_maybe_uncompress", DefaultRecordBatch._maybe_uncompress)
    monkeypatch.setattr(Fetcher.PartitionRecords, "_unpack_records", Fetcher.PartitionRecords._unpack_records)
    install_bounded_decoders(MIB)


# zstd exists only in the v2 record format; lz4 in v0 (Kafka 0.8/0.9) needs xxhash, which we do not install
FORMATS = [(codec, magic) for codec in CODECS for magic in (2, 1, 0) if magic == 2 or codec in ("gzip", "snappy")
           or (codec, magic) == ("lz4", 1)]


@pytest.mark.parametrize("codec,magic", FORMATS)
def test_kafka_python_record_batches_decode_through_the_bounded_decoders(bounded, codec, magic):
    def batch(values: list[bytes]):
        builder = MemoryRecordsBuilder(magic, CODEC_IDS[codec], batch_size=64 * MIB)
        for value in values:
            builder.append(timestamp=None if magic == 0 else 1, key=None, value=value)
        builder.close()
        return MemoryRecords(bytes(builder.buffer())).next_batch()

    values = [b"event %d" % k for k in range(500)]
    assert [record.value for record in batch(values)] == values
    with pytest.raises(DecompressionLimitError) as caught:
        list(batch([bytes(64 * 1024)] * 20))  # 1.25 MiB > the 1 MiB limit
    if magic == 2:  # the v2 header says where the batch ends: a consumer seeks there to skip it
        assert (caught.value.base_offset, caught.value.next_offset) == (0, 20)


# --- against the broker --------------------------------------------------------------------------

def produce_compressed(bootstrap: str, topic: str, codec: str, records: list[tuple[bytes | None, bytes | None, list]],
                       partition: int | None = None, timeout: float = 30.0) -> None:
    """Send (key, value, headers) records with `codec` compression; raises unless all were acknowledged."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type=codec,
                             max_request_size=32 * MIB, batch_size=16 * MIB, linger_ms=50)
    try:
        futures = [producer.send(topic, key=key, value=value, headers=headers, partition=partition)
                   for key, value, headers in records]
        producer.flush(timeout)
        for f in futures:
            f.get(timeout)
    finally:
        producer.close(timeout=10)


def values(messages: list[bytes]) -> list[tuple[None, bytes, list]]:
    return [(None, m, []) for m in messages]


def test_the_learner_applies_events_of_every_codec(kafka_broker, data_dir, tmp_path):
    events = encode(ml100k_events(data_dir, 800))
    create_topic(kafka_broker.bootstrap, "zipped", partitions=2)
    for k, codec in enumerate(CODECS):
        produce_compressed(kafka_broker.bootstrap, "zipped", codec, values(events[k * 200:(k + 1) * 200]))
    store = tmp_path / "store"
    proc = subprocess.run(consume_cmd(kafka_broker.bootstrap, "zipped", store, "--max-events", "800",
                                      "--micro-batch-size", "200"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = inspect_store(store)
    assert info["events"] == 800 and sum(info["offsets"].values()) == 800


async def _aiokafka_read(bootstrap: str, topic: str, expected: int) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        got: list[bytes] = []
        while len(got) < expected:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(r.value for r in records)
        return got
    finally:
        await consumer.stop()


def test_aiokafka_reads_every_codec(kafka_broker):
    create_topic(kafka_broker.bootstrap, "zipped-for-replica", partitions=1)
    sent = {codec: [b"%s %d" % (codec.encode(), k) for k in range(50)] for codec in CODECS}
    for codec, messages in sent.items():
        produce_compressed(kafka_broker.bootstrap, "zipped-for-replica", codec, values(messages))
    got = asyncio.run(asyncio.wait_for(_aiokafka_read(kafka_broker.bootstrap, "zipped-for-replica", 200), 60))
    assert got == [m for messages in sent.values() for m in messages]


def copy_topic(bootstrap: str, source: str, target: str, codecs: list[str]) -> int:
    """Copy `source` (one partition) to `target` in order, its records split evenly between `codecs`."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(source, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    records = []
    deadline = time.monotonic() + 60
    # the high-water mark of fetch responses, not end_offsets(): this broker under-reports those
    while (consumer.highwater(tp) is None or consumer.position(tp) < consumer.highwater(tp)) \
            and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend((r.key, r.value, r.headers) for r in batch)
    consumer.close()
    assert records and time.monotonic() < deadline, f"read {len(records)} records of {source}"
    share = -(-len(records) // len(codecs))
    for k, codec in enumerate(codecs):
        produce_compressed(bootstrap, target, codec, records[k * share:(k + 1) * share])
    return len(records)


def test_the_replica_follows_an_lz4_zstd_and_snappy_updates_topic(kafka_broker, data_dir, tmp_path):
    events = ml100k_events(data_dir, 1000)
    create_topic(kafka_broker.bootstrap, "rated", partitions=1)
    create_topic(kafka_broker.bootstrap, "rated-updates", partitions=1)
    create_topic(kafka_broker.bootstrap, "zipped-updates", partitions=1)
    json_events = encode(events)
    produce_compressed(kafka_broker.bootstrap, "rated", "gzip", values(json_events))
    store = tmp_path / "learner"
    proc = subprocess.run(consume_cmd(kafka_broker.bootstrap, "rated", store, "--max-events", "1000",
                                      "--micro-batch-size", "500", "--updates-topic", "rated-updates"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = inspect_store(store)["model_version"]
    assert copy_topic(kafka_broker.bootstrap, "rated-updates", "zipped-updates", ["lz4", "zstd", "snappy"]) > 3
    replica = Replica(kafka_broker.bootstrap, "zipped-updates", tmp_path, "replica")
    try:
        wait_until(lambda: replica.health().get("model_version") == version, 90, f"the replica at version {version}")
        status, body = replica.get(f"/recommend/{events[0][0]}?k=5")
        assert status == 200 and len(body["items"]) == 5
    finally:
        replica.stop()


def test_poll_raises_at_a_compression_bomb_until_the_consumer_seeks_past_it(kafka_broker, bounded):
    create_topic(kafka_broker.bootstrap, "bombed", partitions=2)
    for partition in (0, 1):
        produce_compressed(kafka_broker.bootstrap, "bombed", "gzip", values([b"before"] * 3), partition=partition)
    produce_compressed(kafka_broker.bootstrap, "bombed", "gzip", values([bytes(MIB)] * 5), partition=1)
    for partition in (0, 1):
        produce_compressed(kafka_broker.bootstrap, "bombed", "gzip", values([b"after"] * 3), partition=partition)
    tps = [TopicPartition("bombed", 0), TopicPartition("bombed", 1)]
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, enable_auto_commit=False)
    try:
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got: dict[int, list[bytes]] = {0: [], 1: []}
        errors: list[DecompressionLimitError] = []
        deadline = time.monotonic() + 60
        while len(errors) < 3 and time.monotonic() < deadline:
            try:
                for tp, records in consumer.poll(timeout_ms=500).items():
                    got[tp.partition].extend(r.value for r in records)
            except DecompressionLimitError as exc:
                errors.append(exc)  # and poll again without seeking: it raises again, it does not spin
        assert len(errors) == 3
        assert {(e.topic_partition, e.base_offset, e.next_offset) for e in errors} == {(tps[1], 3, 8)}
        assert consumer.position(tps[1]) == 3 and got[1] == [b"before"] * 3
        consumer.seek(errors[0].topic_partition, errors[0].next_offset)
        deadline = time.monotonic() + 60
        while min(len(got[0]), len(got[1])) < 6 and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                got[tp.partition].extend(r.value for r in records)
        assert got == {0: [b"before"] * 3 + [b"after"] * 3, 1: [b"before"] * 3 + [b"after"] * 3}
    finally:
        consumer.close()


def test_the_learner_dead_letters_a_compression_bomb_and_reads_on(kafka_broker, data_dir, tmp_path):
    events = encode(ml100k_events(data_dir, 200))
    create_topic(kafka_broker.bootstrap, "bomb", partitions=1)
    produce_compressed(kafka_broker.bootstrap, "bomb", "gzip", values(events[:100]))
    produce_compressed(kafka_broker.bootstrap, "bomb", "gzip", values([bytes(MIB)] * 5))  # 5 MiB of zeros
    produce_compressed(kafka_broker.bootstrap, "bomb", "gzip", values(events[100:]))
    store = tmp_path / "store"
    proc = subprocess.run(consume_cmd(kafka_broker.bootstrap, "bomb", store, "--max-batch-inflated-bytes",
                                      str(2 * MIB), "--fetch-max-bytes", str(MIB), "--idle-exit", "5"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "record batch at offsets 100-104 cannot be decoded" in proc.stderr
    info = inspect_store(store)
    assert info["events"] == 200 and info["offsets"] == {"bomb:0": 205}
    (dead,) = consume_all(kafka_broker.bootstrap, "bomb-dlq", expected=1)
    headers = dict(dead.headers)
    assert headers["reason"] == b"undecodable" and headers["offsets"] == b"100-104"
    assert headers["source"] == b"bomb:0:100" and dead.value == b""
