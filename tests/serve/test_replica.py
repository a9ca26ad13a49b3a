import json

import numpy as np
import pytest

from gnaq_stream.config import LearnerConfig
from gnaq_stream.data.events import Event
from gnaq_stream.serve.replica import NotReady, Replica, UnknownUser
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.updates import UpdatesPublisher
from gnaq_stream.updates_format import UpdateFormatError, decode_meta

CFG = LearnerConfig(dim=8, bits=2, level_dtype="fp8", refine_steps=1, refine_budget_seconds=60.0)


class _Sent:
    is_done, exception = True, None

    def failed(self):
        return False


class RecordingProducer:
    """In-memory stand-in for KafkaProducer: keeps what was sent, in order; every send succeeds."""

    def __init__(self):
        self.records: list[tuple[bytes, bytes]] = []

    def send(self, topic, key, value, headers=None):
        self.records.append((key, value))
        return _Sent()

    def flush(self, timeout=None):
        pass


def _learner_and_records():
    learner = StreamLearner(CFG)
    producer = RecordingProducer()
    publisher = UpdatesPublisher(producer, "updates", CFG.bits)
    events = [Event(f"u{k % 5}", f"i{k % 7}", float(k)) for k in range(12)]
    learner.apply_micro_batch(events)
    learner.refresh_final_embeddings(force=True)
    sent = publisher.publish(learner, np.arange(learner.graph.n_users))
    return learner, publisher, producer, sent


def test_publisher_sends_every_row_then_only_changed_rows():
    learner, publisher, producer, sent = _learner_and_records()
    assert sent == 5 + 7
    assert producer.records[-1][0] == b"M"
    meta = decode_meta(producer.records[-1][1])
    assert (meta["version"], meta["n_users"], meta["n_items"]) == (learner.version, 5, 7)
    producer.records.clear()
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
    with pytest.raises(UpdateFormatError):
        replica.apply(b"X123", b"")
    replica.close()
    restarted = Replica(tmp_path / "r")
    assert restarted.recommend("u0", 3) == answer
    restarted.close()


def test_meta_record_of_another_format_is_refused(tmp_path):
    replica = Replica(tmp_path / "r")
    with pytest.raises(UpdateFormatError):
        replica.apply(b"M", json.dumps({"format": "other/9"}).encode())
    replica.close()


def test_a_new_model_id_replaces_the_old_model(tmp_path):
    _, _, old, _ = _learner_and_records()
    replica = Replica(tmp_path / "r")
    for key, value in old.records:
        replica.apply(key, value)
    fresh = StreamLearner(CFG)  # e.g. a learner restarted on a new store: versions start again at 1
    producer = RecordingProducer()
    fresh.apply_micro_batch([Event("v0", "j0", 1.0), Event("v1", "j1", 2.0)])
    fresh.refresh_final_embeddings(force=True)
    UpdatesPublisher(producer, "updates", CFG.bits).publish(fresh, np.arange(2))
    assert producer.records[0][0] == b"M" and decode_meta(producer.records[0][1])["version"] == -1
    for key, value in producer.records:
        replica.apply(key, value)
    assert replica.meta["model_id"] == fresh.model_id and replica.model_version == fresh.version
    assert replica.recommend("v0", 5)["items"] == [{"item": "j1", "score": pytest.approx(
        replica.recommend("v0", 5)["items"][0]["score"])}]
    with pytest.raises(UnknownUser):
        replica.recommend("u0", 5)
    replica.close()
