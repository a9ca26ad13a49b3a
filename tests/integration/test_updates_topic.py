"""The learner's side of the updates topic against a real broker: a new model deletes the old one's
keys before publishing, and a topic the replicas could not read in order is refused."""

from __future__ import annotations

import subprocess

from gnaq_stream.serve.replica import Replica, UnknownUser
from gnaq_stream.updates_format import META_KEY, decode_meta

from .conftest import consume_all, create_topic, produce
from .test_consume import consume_cmd, encode, ml100k_events


def _learn(bootstrap: str, topic: str, store, group: str, n: int) -> None:
    cmd = consume_cmd(bootstrap, topic, store, "--max-events", str(n), "--updates-topic", "updates")
    cmd[cmd.index("--group") + 1] = group
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_new_model_deletes_the_old_models_keys_so_a_compacted_topic_holds_only_it(kafka_broker, data_dir,
                                                                                     tmp_path):
    events = ml100k_events(data_dir, 600)
    create_topic(kafka_broker.bootstrap, "a", partitions=1)
    create_topic(kafka_broker.bootstrap, "b", partitions=1)
    produce(kafka_broker.bootstrap, "a", encode(events[:400]))
    produce(kafka_broker.bootstrap, "b", encode([(u + 10_000, i, t) for u, i, t in events[400:]]))  # other users
    _learn(kafka_broker.bootstrap, "a", tmp_path / "store-a", "g-a", 400)
    a_records = consume_all(kafka_broker.bootstrap, "updates", expected=1)
    _learn(kafka_broker.bootstrap, "b", tmp_path / "store-b", "g-b", 200)
    records = consume_all(kafka_broker.bootstrap, "updates", expected=len(a_records) + 1)[len(a_records):]

    a_keys = {r.key for r in a_records if r.key != META_KEY}
    first_b_meta = next(k for k, r in enumerate(records) if r.key == META_KEY and r.value is not None)
    tombstones = {r.key for r in records[:first_b_meta] if r.value is None}
    assert tombstones == a_keys  # every key of model A, before anything of model B
    assert decode_meta(records[first_b_meta].value)["version"] == -1

    # a compacted topic: the last record per key, tombstoned keys gone
    last = {}
    for r in a_records + records:
        last.pop(r.key, None)
        last[r.key] = r.value
    replica = Replica(tmp_path / "replica")
    try:
        for key, value in last.items():
            if value is not None:
                replica.apply(key, value)
        b_user = str(events[400][0] + 10_000)
        assert replica.recommend(b_user, 5)["items"]
        try:
            replica.recommend(str(events[0][0]), 5)
            raise AssertionError("a user of model A only is still served")
        except UnknownUser:
            pass
    finally:
        replica.close()


def test_an_updates_topic_with_several_partitions_is_refused_at_start(kafka_broker, tmp_path):
    create_topic(kafka_broker.bootstrap, "events", partitions=1)
    create_topic(kafka_broker.bootstrap, "wide-updates", partitions=3)
    proc = subprocess.run(consume_cmd(kafka_broker.bootstrap, "events", tmp_path / "store", "--updates-topic",
                                      "wide-updates", "--max-events", "1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "updates topic 'wide-updates' has 3 partitions; it must have exactly one" in proc.stderr
    assert "Traceback" not in proc.stderr
