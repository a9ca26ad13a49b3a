import json
import random
import struct
import tracemalloc

import numpy as np
import pytest
from doubles import RecordingProducer

from gnaq_stream.config import LearnerConfig
from gnaq_stream.data.events import Event
from gnaq_stream.serve.replica import NotReady, RejectedUpdate, Replica, UnknownUser
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.updates import DENSE_BLOCK_ROWS, UpdatesPublisher
from gnaq_stream.updates_format import (BLOCK_ROWS, META_KEY, block_record, decode_meta, expand_block,
                                        history_block_key, history_block_record, history_record, history_span,
                                        meta_record, row_key, row_record, user_history)

CFG = LearnerConfig(dim=8, bits=2, level_dtype="fp8", refine_steps=1, refine_budget_seconds=60.0)


def _learner_and_records():
    learner = StreamLearner(CFG)
    producer = RecordingProducer()
    publisher = UpdatesPublisher(producer, "updates", CFG.bits)
    events = [Event(f"u{k % 5}", f"i{k % 7}", float(k)) for k in range(12)]
    learner.apply_micro_batch(events)
    learner.refresh_final_embeddings(force=True)
    sent = publisher.publish(learner, np.arange(learner.graph.n_users))
    return learner, publisher, producer, sent


def _published(events: list[Event], stale_keys: list[bytes] = ()) -> tuple[StreamLearner, list]:
    """A new model (its own model id) learnt from `events` and every record its first publication sent."""
    learner, producer = StreamLearner(CFG), RecordingProducer()
    learner.apply_micro_batch(events)
    learner.refresh_final_embeddings(force=True)
    UpdatesPublisher(producer, "updates", CFG.bits, stale_keys=stale_keys).publish(learner,
                                                                                 np.arange(learner.graph.n_users))
    return learner, producer.records


def _fed(path, records, **kwargs) -> Replica:
    replica = Replica(path, **kwargs)
    for key, value in records:
        replica.apply(key, value)
    return replica


def _answers(replica: Replica, users) -> dict:
    return {user: replica.recommend(user, 50) for user in users}


def _rejected(replica: Replica, key: bytes, value: bytes | None) -> str:
    with pytest.raises(RejectedUpdate) as info:
        replica.apply(key, value)
    return info.value.reason


def test_publisher_sends_every_row_then_only_changed_rows():
    learner, publisher, producer, sent = _learner_and_records()
    assert sent == 5 + 7
    assert producer.records[-1][0] == b"M"
    meta = decode_meta(producer.records[-1][1])
    assert (meta["version"], meta["n_users"], meta["n_items"]) == (learner.version, 5, 7)
    producer.sent.clear()
    assert publisher.publish(learner, np.zeros(0, dtype=np.int64)) == 0 and producer.records == []
    learner.apply_micro_batch([Event("u0", "i_new", 99.0)])
    learner.refresh_final_embeddings(force=True)
    sent = publisher.publish(learner, np.array([0]))
    keys = [k for k, _ in producer.records]
    assert b"I\x00\x00\x00\x07i_new" in keys and 0 < sent == sum(k[:1] in b"UI" for k in keys) <= 13


def test_replica_answers_from_the_records_and_again_after_a_restart(tmp_path):
    learner, _, producer, _ = _learner_and_records()
    replica = Replica(tmp_path / "r")
    with pytest.raises(NotReady):
        replica.recommend("u0", 3)
    for key, value in producer.records:
        assert replica.apply(key, value)
    answer = replica.recommend("u0", 3)
    seen = {learner.graph.items.external[i] for i in learner.graph.user_items[0]}
    assert answer["model_version"] == learner.version and len(answer["items"]) == 3
    assert not seen & {row["item"] for row in answer["items"]}
    with pytest.raises(UnknownUser):
        replica.recommend("nobody", 3)
    key, value = next((k, v) for k, v in producer.records if k[:1] == b"U")
    older = (0).to_bytes(8, "little") + value[8:]
    assert not replica.apply(key, older)  # an older record for a key is ignored
    assert _rejected(replica, b"X123", b"") == "malformed"
    replica.close()
    restarted = Replica(tmp_path / "r")
    assert restarted.recommend("u0", 3) == answer and restarted.ready
    restarted.close()


def test_a_new_model_id_replaces_the_old_model(tmp_path):
    _, _, old, _ = _learner_and_records()
    replica = _fed(tmp_path / "r", old.records)
    fresh, records = _published([Event("v0", "j0", 1.0), Event("v1", "j1", 2.0)])
    assert records[0][0] == b"M" and decode_meta(records[0][1])["version"] == -1
    for key, value in records:
        replica.apply(key, value)
    assert replica.meta["model_id"] == fresh.model_id and replica.model_version == fresh.version
    assert replica.recommend("v0", 5)["items"] == [{"item": "j1", "score": pytest.approx(
        replica.recommend("v0", 5)["items"][0]["score"])}]
    with pytest.raises(UnknownUser):
        replica.recommend("u0", 5)
    replica.close()


# --- a model switch on a compacted topic --------------------------------------------------------

A_EVENTS = [Event(f"u{k % 5}", f"i{k % 7}", float(k)) for k in range(12)]
# B shares some keys with A (u0 at index 0), some indices under other ids (i1 at A's i0 index), and
# has users and items A lacks; u2..u4 and i2..i6 are A's only
B_EVENTS = [Event(u, i, float(k)) for k, (u, i) in enumerate(
    [("u0", "i1"), ("v0", "j0"), ("u1", "j1"), ("v1", "i0"), ("v0", "j2"), ("v2", "j3"), ("u0", "j0")])]


def _compacted(records: list, keep_tombstones: bool) -> list:
    """What log compaction leaves: the last record of each key, in the order of those last records."""
    last = {key: (position, value) for position, (key, value) in enumerate(records)}
    kept = sorted(last.items(), key=lambda item: item[1][0])
    return [(key, value) for key, (_, value) in kept if value is not None or keep_tombstones]


@pytest.mark.parametrize("order", ["live", "compacted, tombstones kept", "compacted, tombstones removed"])
def test_after_a_model_switch_only_the_new_model_is_served(tmp_path, order):
    _, a_records = _published(A_EVENTS)
    a_keys = list(dict.fromkeys(key for key, _ in a_records if key != META_KEY))
    b, b_records = _published(B_EVENTS, stale_keys=a_keys)
    assert [value for _, value in b_records[:len(a_keys)]] == [None] * len(a_keys)
    topic = a_records + b_records
    if order != "live":
        topic = _compacted(topic, keep_tombstones=order == "compacted, tombstones kept")
    replica = _fed(tmp_path / "replica", topic)
    reference = _fed(tmp_path / "reference", b_records[len(a_keys):])  # B alone
    b_users = list(b.graph.users.external)
    assert replica.ready and replica.meta == reference.meta and replica.info() == reference.info()
    assert _answers(replica, b_users) == _answers(reference, b_users)
    for user in ("u2", "u3", "u4"):
        with pytest.raises(UnknownUser):
            replica.recommend(user, 5)
    b_keys = {key for key, value in b_records if value is not None}
    assert set(replica.db.keys()) == b_keys  # the store holds nothing of A either
    replica.close()
    restarted = Replica(tmp_path / "replica")
    assert _answers(restarted, b_users) == _answers(reference, b_users)
    restarted.close()
    reference.close()


def test_a_tombstone_drops_only_the_row_of_its_own_key(tmp_path):
    learner, records = _published(A_EVENTS)
    replica = _fed(tmp_path / "r", records)
    assert replica.ready
    assert not replica.apply(row_key("user", 0, "someone-else"), None)  # same index, another id: kept
    replica.recommend("u0", 3)
    assert replica.apply(row_key("user", 0, "u0"), b"")  # b"" is a tombstone too
    with pytest.raises(UnknownUser):
        replica.recommend("u0", 3)
    assert not replica.ready and replica.info()["users"] == 4  # u0's row is missing now
    item = learner.graph.items.external[6]
    assert replica.apply(row_key("item", 6, item), None)
    assert replica.apply(b"H\x00\x00\x00\x01", None) and replica.db.get(b"H\x00\x00\x00\x01") is None
    answer = {row["item"] for row in replica.recommend("u1", 10)["items"]}
    assert item not in answer  # a deleted item is never recommended
    assert answer & {learner.graph.items.external[i] for i in learner.graph.user_items[1]}  # history gone
    assert _rejected(replica, META_KEY, None) == "malformed"
    row = next(value for key, value in records if key[:1] == b"U")[8:]
    assert replica.apply(*row_record("user", 1, "renamed", 10**6, row))  # another id at a held index
    assert replica.recommend("renamed", 3)
    with pytest.raises(UnknownUser):
        replica.recommend("u1", 3)
    replica.close()


def test_a_learner_restarted_with_other_serve_bits_is_followed(tmp_path):
    learner, records = _published(A_EVENTS)
    replica = _fed(tmp_path / "r", records)
    producer = RecordingProducer()  # same model id, rows of another width from its first meta record on
    UpdatesPublisher(producer, "updates", 4).publish(learner, np.arange(learner.graph.n_users))
    replica.apply(*producer.records[0])
    assert replica.meta["bits"] == 4 and not replica.ready
    for key, value in producer.records[1:]:
        assert replica.apply(key, value)
    assert replica.ready and replica.info()["model_bytes"] == 12 * len(producer.records[-2][1][8:])
    assert len(replica.recommend("u0", 20)["items"]) == 7 - len(learner.graph.user_items[0])
    replica.close()


# --- faults: nothing a record holds stops the replica or changes what it serves ------------------

def test_a_row_of_another_width_is_rejected_and_serving_is_unaffected(tmp_path):
    learner, records = _published(A_EVENTS)
    replica = _fed(tmp_path / "r", records)
    users = list(learner.graph.users.external)
    before = _answers(replica, users)
    row = next(value for key, value in records if key[:1] == b"U")[8:]
    for kind, index, external_id in (("user", 0, "u0"), ("item", 0, "i0"), ("user", 99, "new")):
        for wrong in (row + b"\x00" * 4, row[:-1]):  # e.g. a learner restarted with another --serve-bits
            assert _rejected(replica, *row_record(kind, index, external_id, 10**6, wrong)) == "width"
    assert _answers(replica, users) == before and replica.ready
    replica.close()


def test_rows_before_the_meta_record_have_the_width_of_the_first_ones(tmp_path):
    _, records = _published(A_EVENTS)
    rows = [(key, value) for key, value in records if key[:1] in b"UI"]
    replica = Replica(tmp_path / "r")
    for key, value in rows:
        assert replica.apply(key, value)
        assert _rejected(replica, key, value + b"\x00") == "width"
    meta = [(key, value) for key, value in records if key == META_KEY][-1]
    assert replica.apply(*meta) and replica.ready
    other = Replica(tmp_path / "other")  # rows that do not fit the meta record that comes are dropped
    other.apply(rows[0][0], rows[0][1] + b"\x00")
    assert other.info()["users"] == 1 and other.apply(*meta) and other.info()["users"] == 0
    replica.close()
    other.close()


def test_an_index_beyond_the_cap_is_rejected_and_never_allocated(tmp_path):
    _, records = _published(A_EVENTS)
    replica = _fed(tmp_path / "r", records, max_nodes=1000)
    row = next(value for key, value in records if key[:1] == b"U")[8:]
    memory = replica.memory_bytes
    for index in (1000, 2**32 - 1):
        assert _rejected(replica, *row_record("user", index, "x", 1, row)) == "index"
        assert _rejected(replica, *row_record("item", index, "x", 1, row)) == "index"
        assert _rejected(replica, *history_record(index, 1, np.arange(3))) == "index"
    meta = dict(decode_meta(records[-1][1]), version=10**6, n_users=1001)
    assert _rejected(replica, *meta_record(meta)) == "index"
    assert replica.memory_bytes == memory and replica.ready
    default = Replica(tmp_path / "default")  # ServeConfig.max_nodes (1 << 24) per kind
    assert _rejected(default, *row_record("user", 2**32 - 1, "x", 1, row)) == "index"
    assert default.memory_bytes < 1 << 20
    replica.close()
    default.close()


def test_malformed_records_are_rejected_and_serving_is_unaffected(tmp_path):
    learner, records = _published(A_EVENTS)
    replica = _fed(tmp_path / "r", records)
    users = list(learner.graph.users.external)
    before = _answers(replica, users)
    meta = decode_meta(records[-1][1])
    row = next(value for key, value in records if key[:1] == b"U")[8:]
    bad = [
        (META_KEY, b"[1, 2]"), (META_KEY, b"\xff"), (META_KEY, b'"meta"'), (META_KEY, b"[" * 10**5),
        (META_KEY, json.dumps({"format": "other/9"}).encode()),
        meta_record({k: v for k, v in meta.items() if k != "n_items"}),
        meta_record(dict(meta, model_id="another", dim=0)),  # checked before the held model is dropped
        meta_record(dict(meta, version=10**6, bits=5)), meta_record(dict(meta, version=10**6, level_dtype="bf3")),
        meta_record(dict(meta, version=10**6, dim=10**9)), meta_record(dict(meta, version=10**6, n_users=-1)),
        meta_record(dict(meta, version="7")), meta_record(dict(meta, version=10**400)),
        (b"U\x00", row), (b"Z\x00\x00\x00\x00", row), (b"U\x00\x00\x00\x00\xff\xfe", struct.pack("<Q", 9) + row),
        (b"H\x00\x00\x00\x00", struct.pack("<Q", 9) + b"\x01\x02"), (b"H\x00\x00\x00\x00x", struct.pack("<Q", 9)),
        (b"U\x00\x00\x00\x00u0", b"\x01\x02"), row_record("user", 0, "u0", 2**63, row), (b"", b"\x00" * 30),
    ]
    for key, value in bad:
        assert _rejected(replica, key, value) == "malformed"
    assert _answers(replica, users) == before and replica.ready
    replica.close()


def test_no_mutation_of_a_record_raises_anything_but_rejected_update(tmp_path):
    _, records = _published(A_EVENTS)
    replica = _fed(tmp_path / "r", records, max_nodes=1000)  # the cap's own cost is not this test's subject
    rng = random.Random(7)

    def mutate(data: bytes) -> bytes:
        data = bytearray(data)
        op = rng.randrange(4)
        if op == 0 and data:
            del data[rng.randrange(len(data)):]
        elif op == 1:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    outcomes = set()
    for _ in range(2000):
        key, value = rng.choice(records)
        value = value or b""
        key, value = (mutate(key), value) if rng.random() < 0.3 else (key, mutate(value))
        try:
            outcomes.add(replica.apply(key, value))
        except RejectedUpdate as exc:
            outcomes.add(exc.reason)
    assert {"malformed", "width", "index", True, False} <= outcomes
    replica.recommend("u1", 5)
    replica.close()


def test_ready_only_once_a_complete_model_is_held(tmp_path):
    learner, records = _published(A_EVENTS)
    replica = Replica(tmp_path / "r")
    assert not replica.ready
    *body, last = records
    assert decode_meta(body[0][1])["version"] == -1
    for key, value in body:
        replica.apply(key, value)
        assert not replica.ready  # rows arriving under the first meta record, of version -1
    item_row = next(i for i, (key, _) in enumerate(records) if key[:1] == b"I")
    holey = Replica(tmp_path / "holey")  # the final meta record, an item row missing
    for key, value in records[:item_row] + records[item_row + 1:]:
        holey.apply(key, value)
    assert holey.model_version == learner.version and not holey.ready
    holey.apply(*records[item_row])
    assert holey.ready
    replica.apply(*last)
    assert replica.ready
    replica.close()
    holey.close()


def _synthetic_rows(n: int, width: int, version: int = 1, seed: int = 0) -> list:
    """Row records of n users and n items with random bytes and short ids ("u17", "i17")."""
    rows = np.random.default_rng(seed).integers(0, 256, size=(2 * n, width), dtype=np.uint8)
    return [row_record(kind, k, f"{kind[0]}{k}", version, rows[2 * k + (kind == "item")].tobytes())
            for k in range(n) for kind in ("user", "item")]


def test_memory_per_node_is_within_twice_the_row_and_matches_what_python_allocates(tmp_path):
    meta = {"model_id": "m", "dim": 64, "bits": 2, "level_dtype": "fp8", "version": 1, "n_users": 20000,
            "n_items": 20000}
    width = 20  # 16 code bytes and 4 fp8 levels
    rows = _synthetic_rows(20000, width)
    warm = _fed(tmp_path / "warm", [meta_record(meta)] + rows[:10])  # compiled kernels loaded before counting
    warm.close()
    replica = Replica(tmp_path / "r")
    tracemalloc.start()
    replica.apply(*meta_record(meta))
    for start in range(0, len(rows), 5000):
        assert all(outcome is True for outcome in replica.apply_many(rows[start:start + 5000]))
    allocated = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert replica.ready and replica.model_bytes == 40000 * width
    # row, version, id (offset, length, bytes) and, for users, a hash slot: at most twice the row
    assert replica.memory_bytes <= 2 * replica.model_bytes
    assert 0.8 < replica.memory_bytes / allocated < 1.25
    assert replica.recommend("u123", 5)["user"] == "u123"
    memory = replica.memory_bytes
    replica.apply_many([(row_key("user", u, f"u{u}"), None) for u in range(10000)])
    assert replica.info()["users"] == 10000 and replica.memory_bytes <= memory  # arrays stay allocated
    with pytest.raises(UnknownUser):
        replica.recommend("u123", 5)
    replica.close()


def test_ids_replaced_many_times_are_compacted_and_every_held_id_is_found(tmp_path):
    _, records = _published(A_EVENTS)
    row = next(value for key, value in records if key[:1] == b"U")[8:]
    replica = Replica(tmp_path / "r")  # no meta record: tables grow (and rehash) as rows come
    n = 3000
    for version in range(1, 6):  # every user renamed each time: the old ids' bytes are dead
        outcomes = replica.apply_many([row_record("user", u, f"user-{u}-v{version}-{'x' * 20}", version, row)
                                       for u in range(n)])
        assert outcomes == [True] * n
    users = replica.users
    assert users.ids_used < 2 * users.ids_live  # compacted: the dead bytes were dropped
    assert replica.apply_many([(row_key("user", u, f"user-{u}-v5-{'x' * 20}"), None) for u in range(0, n, 2)]) \
        == [True] * (n // 2)
    replica.apply(*[record for record in records if record[0] == META_KEY][-1])  # the model's shape: rows kept
    for u in range(n):
        held = replica.users.lookup(f"user-{u}-v5-{'x' * 20}")
        assert held == (u if u % 2 else None) and replica.users.lookup(f"user-{u}-v4-{'x' * 20}") is None
        if u % 2:
            assert replica.users.external_id(u) == f"user-{u}-v5-{'x' * 20}"
    replica.close()


# --- applying a batch: the same as one record at a time ------------------------------------------

def _state(replica: Replica, users) -> tuple:
    answers = {}
    for user in users:
        try:
            answers[user] = replica.recommend(user, 50)
        except (UnknownUser, NotReady) as exc:
            answers[user] = type(exc).__name__
    return replica.info(), replica.ready, answers, dict(replica.db.items())


def _outcome(outcome) -> object:
    return outcome.reason if isinstance(outcome, RejectedUpdate) else outcome


def test_a_batch_applies_its_good_records_and_rejects_each_bad_one_with_its_reason(tmp_path):
    learner, records = _published(A_EVENTS)
    row = next(value for key, value in records if key[:1] == b"U")[8:]
    replica = Replica(tmp_path / "r", max_nodes=1000)
    replica.apply(*records[0])  # the first meta record: rows after it go the batch way
    bad = {
        "malformed": [(b"U\x00\x00\x00\x00\xff\xfe", struct.pack("<Q", 9) + row), row_record("user", 0, "u0", 2**63, row),
                      row_record("item", 1, "x" * 1025, 9, row), (b"Z\x00\x00\x00\x00", row)],
        "width": [row_record("user", 0, "u0", 9, row + b"\x00"), row_record("item", 3, "i3", 9, row[:-1])],
        "index": [row_record("user", 1000, "far", 9, row), row_record("item", 5000, "far", 9, row),
                  history_record(1000, 9, np.arange(3))],
    }
    batch, expected = [], []
    for k, record in enumerate(records[1:]):
        batch.append(record)
        expected.append(True)
        reason = list(bad)[k % 3]
        if bad[reason]:
            batch.append(bad[reason].pop())
            expected.append(reason)
    assert not any(bad.values())
    assert [_outcome(o) for o in replica.apply_many(batch)] == expected
    reference = _fed(tmp_path / "reference", records)
    users = list(learner.graph.users.external)
    assert replica.ready and _state(replica, users) == _state(reference, users)
    replica.close()
    reference.close()


def test_an_older_record_in_the_same_batch_as_a_newer_one_leaves_the_newer(tmp_path):
    _, records = _published(A_EVENTS)
    replica = _fed(tmp_path / "r", records)
    rows = {key: value for key, value in records if key[:1] in b"UIH"}
    (user_key, user_value), (item_key, item_value) = [next((k, v) for k, v in rows.items() if k[:1] == kind)
                                                      for kind in (b"U", b"I")]
    history_key = next(k for k in rows if k[:1] == b"H")
    newer = [(user_key, struct.pack("<Q", 50) + user_value[8:][::-1]), (item_key, struct.pack("<Q", 50) + item_value[8:]),
             (history_key, struct.pack("<Q", 50) + np.arange(2, dtype="<u4").tobytes())]
    older = [(key, struct.pack("<Q", 40) + value[8:]) for key, value in newer]
    outcomes = replica.apply_many([newer[0], older[0], older[1], newer[1], newer[2], older[2]])
    assert outcomes == [True, False, True, True, True, False]
    for key, value in newer:
        assert replica.db.get(key) == value  # the newer record is the one stored
    user = user_key[5:].decode()
    assert replica.recommend(user, 3)["user_version"] == 50
    restarted = Replica(tmp_path / "restarted")  # and the one served: same as the newer alone
    for key, value in records + newer:
        restarted.apply(key, value)
    assert replica.recommend(user, 20) == restarted.recommend(user, 20)
    replica.close()
    restarted.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_ends_in_the_state_of_its_records_applied_one_by_one(tmp_path, seed):
    """Two models, tombstones, rows before and after meta records, duplicates, stale versions and
    bad records, cut into random batches: same outcomes, same state, same store as one by one."""
    a, a_records = _published(A_EVENTS)
    a_keys = list(dict.fromkeys(key for key, _ in a_records if key != META_KEY))
    b, b_records = _published(B_EVENTS, stale_keys=a_keys)
    rng = random.Random(seed)
    row = next(value for key, value in a_records if key[:1] == b"U")[8:]
    three = np.frombuffer(row * 3, dtype=np.uint8).reshape(3, -1)
    extra = [row_record("user", 0, "u0", 0, row), row_record("item", 2, "moved", 10**6, row),
             row_record("user", 3, "u3", 10**6, row + b"\x00"), (row_key("user", 1, "u1"), None),
             (b"H\x00\x00\x00\x02", None), history_record(2, 10**6, np.arange(4)), (META_KEY, b"[]"),
             block_record("item", 0, 10**6, b"i0i1moved", np.array([2, 2, 5]), three), (b"BI\x00\x00\x00\x00", None)]
    topic = a_records[:]
    for record in extra:
        topic.insert(rng.randrange(1, len(topic)), record)
    topic += rng.sample(a_records, 5) + b_records
    one_by_one, batched = Replica(tmp_path / "one"), Replica(tmp_path / "batched")
    single, grouped = [], []
    for record in topic:
        try:
            single.append(one_by_one.apply(*record))
        except RejectedUpdate as exc:
            single.append(exc.reason)
    at = 0
    while at < len(topic):
        size = rng.randrange(1, 12)
        grouped += [_outcome(o) for o in batched.apply_many(topic[at:at + size])]
        at += size
    users = list(a.graph.users.external) + list(b.graph.users.external) + ["moved"]
    assert grouped == single and "width" in single and False in single
    assert _state(batched, users) == _state(one_by_one, users)
    one_by_one.close()
    batched.close()
    assert _state(Replica(tmp_path / "batched"), users) == _state(Replica(tmp_path / "one"), users)


def test_a_micro_batch_publishes_the_rows_of_its_new_users_and_items_without_a_propagation(tmp_path):
    learner, publisher, producer, _ = _learner_and_records()
    final_version, first = learner.final_version, producer.records
    producer.sent.clear()
    learner.apply_micro_batch([Event("u-new", "i-new", 100.0), Event("u1", "i0", 101.0)])
    assert learner.final_version == final_version  # no propagation since the last publication
    users = np.array([learner.graph.users.get("u-new"), learner.graph.users.get("u1")])
    publisher.publish(learner, users, (users[:1], np.array([learner.graph.items.get("i-new")])))
    keys = [k for k, _ in producer.records]
    assert b"M" not in keys  # not a full publication
    assert [k for k in keys if k[:1] in b"UI"] == [b"U" + (5).to_bytes(4, "big") + b"u-new",
                                                   b"I" + (7).to_bytes(4, "big") + b"i-new"]
    assert b"H" + (1).to_bytes(4, "big") in keys  # an existing user's history goes out with the batch
    replica = Replica(tmp_path / "r")
    for key, value in first + producer.records:  # the model as first published, then the batch's records
        replica.apply(key, value)
    answer = replica.recommend("u-new", 3)
    assert answer["user_version"] == learner.version and "i-new" not in [r["item"] for r in answer["items"]]
    replica.close()


def test_a_history_too_long_for_one_kafka_request_is_cut_to_its_latest_items(monkeypatch):
    from gnaq_stream.stream import updates

    monkeypatch.setattr(updates, "MAX_HISTORY_ITEMS", 3)
    learner, publisher, producer, _ = _learner_and_records()
    producer.sent.clear()
    learner.apply_micro_batch([Event("u0", f"extra{k}", 200.0 + k) for k in range(5)])
    publisher.publish(learner, np.array([0]))
    (value,) = [v for k, v in producer.records if k == b"H" + (0).to_bytes(4, "big")]
    held = np.frombuffer(value[8:], dtype="<u4").tolist()
    assert held == list(learner.graph.user_items[0][-3:]) and len(learner.graph.user_items[0]) > 3


def _dense_learner() -> tuple[StreamLearner, UpdatesPublisher, RecordingProducer]:
    """A model of 300 users and 300 items, every serving row published once."""
    learner, producer = StreamLearner(CFG), RecordingProducer()
    publisher = UpdatesPublisher(producer, "updates", CFG.bits)
    learner.apply_micro_batch([Event(f"u{k % 300}", f"i{(7 * k) % 300}", float(k)) for k in range(1500)])
    learner.refresh_final_embeddings(force=True)
    publisher.publish(learner, np.arange(learner.graph.n_users))
    return learner, publisher, producer


def _expanded(records: list) -> list:
    """The same records with each block record of rows replaced by the row records it stands for."""
    return [row for key, value in records
            for row in (expand_block(key, value) if key[:1] == b"B" and key[:2] != b"BH" else [(key, value)])]


def _held_history(replica: Replica, user: int) -> list[int]:
    return sorted(user_history(user, *replica.db[[b"H" + user.to_bytes(4, "big"), history_block_key(user)]]).tolist())


def test_histories_of_a_block_dense_in_touched_users_go_out_in_one_record_and_the_newer_record_wins(tmp_path):
    learner, publisher, producer = _dense_learner()  # 300 users: blocks 0 (256 users) and 1 (44)
    replica = _fed(tmp_path / "r", producer.records)
    batches = [[f"u{k}" for k in range(DENSE_BLOCK_ROWS)] + ["u260", "u270"],  # block 0 dense, 1 not
               ["u5", "u299"],  # single records newer than the block records
               [f"u{k}" for k in range(256, 256 + DENSE_BLOCK_ROWS)]]  # block 1 dense again
    expected_keys = [{history_block_key(0), b"H" + (260).to_bytes(4, "big"), b"H" + (270).to_bytes(4, "big")},
                     {b"H" + (5).to_bytes(4, "big"), b"H" + (299).to_bytes(4, "big")}, {history_block_key(256)}]
    for batch, (names, keys) in enumerate(zip(batches, expected_keys)):
        producer.sent.clear()
        learner.apply_micro_batch([Event(name, f"i-new{batch}", 20_000.0 + batch) for name in names])
        publisher.publish(learner, np.array([learner.graph.users.get(name) for name in names]))
        assert {key for key, _ in producer.records if key[:1] == b"H" or key[:2] == b"BH"} == keys
        for key, value in producer.records:
            replica.apply(key, value)
        for user in range(learner.graph.n_users):  # every user's history, from whichever record is newer
            assert _held_history(replica, user) == sorted(learner.graph.user_items[user].tolist())
    block = dict(producer.records)[history_block_key(256)]
    assert history_span(history_block_key(256), block) == (256, 44, learner.version)
    answers = _answers(replica, ["u5", "u260", "u299"])
    assert all(f"i-new{b}" not in [r["item"] for r in answers["u5"]["items"]] for b in (0, 1))
    replica.close()
    assert _answers(Replica(tmp_path / "r"), ["u5", "u260", "u299"]) == answers  # after a restart too


def test_a_history_block_too_big_for_one_record_goes_user_by_user(monkeypatch):
    from gnaq_stream.stream import updates

    learner, publisher, producer = _dense_learner()
    monkeypatch.setattr(updates, "MAX_BLOCK_BYTES", 10 + 4 * 256 + 4 * 100)  # block 0 holds 256 items, 1 44
    producer.sent.clear()
    publisher.publish(learner, np.arange(learner.graph.n_users))
    keys = {key for key, _ in producer.records if key[:1] == b"H" or key[:2] == b"BH"}
    assert keys == {history_block_key(256)} | {b"H" + u.to_bytes(4, "big") for u in range(256)}


def test_a_bad_history_block_record_is_rejected_with_its_reason_and_a_tombstone_deletes_it(tmp_path):
    learner, _, producer = _dense_learner()
    replica = _fed(tmp_path / "r", producer.records, max_nodes=400)
    users = list(learner.graph.users.external)
    before = _state(replica, users)
    key, value = history_block_record(0, 10**6, np.array([2, 1]), np.array([5, 6, 7]))
    bad = {"malformed": [(key, value[:-1]), (key, value[:9]), (key + b"\x00", value),
                         (key, struct.pack("<QH", 10**6, 0))],
           "index": [(history_block_key(512), value)]}  # users 512 and 513, max_nodes 400
    for reason, records in bad.items():
        for record in records:
            assert _rejected(replica, *record) == reason
    assert _state(replica, users) == before
    assert replica.apply(history_block_key(0), None) is True  # the dense first publication sent block 0
    assert replica.db.get(history_block_key(0)) is None and replica.apply(history_block_key(0), None) is False
    replica.close()


def test_a_block_record_stands_for_the_row_records_of_its_nodes():
    rows = np.arange(30, dtype=np.uint8).reshape(3, 10)
    key, value = block_record("item", 2, 7, "abéc".encode(), np.array([1, 3, 1]), rows)
    assert expand_block(key, value) == [row_record("item", 2 * BLOCK_ROWS + k, name, 7, rows[k].tobytes())
                                        for k, name in enumerate(["a", "bé", "c"])]


def test_a_dense_publication_goes_out_in_block_records_that_a_replica_applies_as_its_rows(tmp_path):
    learner, publisher, producer = _dense_learner()
    records = producer.records
    # 300 users and 300 items: blocks 0 (256 rows) and 1 (44 rows) of each kind hold every row
    assert sorted(key for key, _ in records if key[:1] in b"UIB" and key[:2] != b"BH") == \
        [kind + b.to_bytes(4, "big") for kind in (b"BI", b"BU") for b in (0, 1)]
    replica, reference = _fed(tmp_path / "blocks", records), _fed(tmp_path / "rows", _expanded(records))
    users = list(learner.graph.users.external)
    assert replica.ready and _state(replica, users) == _state(reference, users)  # the store holds row records
    # the next propagation: a block record where >= DENSE_BLOCK_ROWS of a block's rows changed, else row records
    held = {kind: rows.copy() for kind, rows in publisher.sent.items()}
    producer.sent.clear()
    learner.apply_micro_batch([Event(f"u{k}", "i-new", 9_999.0 + k) for k in range(40)])
    learner.refresh_final_embeddings(force=True)
    sent = publisher.publish(learner, np.zeros(0, dtype=np.int64))
    changed = {kind: np.flatnonzero((publisher.sent[kind][:len(held[kind])] != held[kind]).any(1))
               for kind in held}
    changed["item"] = np.append(changed["item"], 300)  # the new item
    expected = set()
    for kind, idx in changed.items():
        blocks, counts = np.unique(idx // BLOCK_ROWS, return_counts=True)
        dense = blocks[counts >= DENSE_BLOCK_ROWS]
        head = b"U" if kind == "user" else b"I"
        expected |= {b"B" + head + b.to_bytes(4, "big") for b in dense.tolist()}
        expected |= {head + i.to_bytes(4, "big") for i in idx[~np.isin(idx // BLOCK_ROWS, dense)].tolist()}
    assert expected and any(key[:1] == b"B" for key in expected) and any(key[:1] != b"B" for key in expected)
    assert {key if key[:1] == b"B" else key[:5] for key, _ in producer.records
            if key[:1] in b"UIB" and key[:2] != b"BH"} == expected
    assert sent == sum(len(idx) for idx in changed.values())
    for record in producer.records:
        replica.apply(*record)
    for record in _expanded(producer.records):
        reference.apply(*record)
    assert _state(replica, users) == _state(reference, users)
    replica.close()
    assert _state(Replica(tmp_path / "blocks"), users) == _state(reference, users)  # after a restart too
    reference.close()


def test_a_bad_block_record_is_rejected_whole_and_changes_nothing(tmp_path):
    learner, _, producer = _dense_learner()
    records = producer.records
    replica = _fed(tmp_path / "r", records, max_nodes=400)
    users = list(learner.graph.users.external)
    before = _state(replica, users)
    key, value = next((k, v) for k, v in records if k == b"BU" + bytes(4))
    width = replica.users.width
    row = value[-width:]
    newer = struct.pack("<QH", 10**6, BLOCK_ROWS) + value[10:]

    def one(id_bytes: bytes, row_bytes: bytes = row) -> bytes:
        return struct.pack("<QHH", 10**6, 1, len(id_bytes)) + id_bytes + row_bytes

    bad = {
        "malformed": [(key, value[:-1]), (key, value[:8] + b"\x00\x00"), (key, one(b"\xff\xfe\xfd")),
                      (key, one(b"x" * 1025)), (b"BX" + bytes(4), newer), (key + b"\x00", newer)],
        "index": [(b"BU" + (1).to_bytes(4, "big"), newer)],  # nodes 256..511, max_nodes 400
        "width": [(key, one(b"u0", row + b"\x00"))],
    }
    for reason, bad_records in bad.items():
        for record in bad_records:
            assert _rejected(replica, *record) == reason
    assert replica.apply(key, None) is False  # a block's tombstone: its rows stay, under their own keys
    assert _state(replica, users) == before
    replica.close()
