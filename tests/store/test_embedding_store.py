import json

import numpy as np
import pytest
import torch

from gnaq_stream.config import LearnerConfig
from gnaq_stream.data.events import Event
from gnaq_stream.store.embedding_store import EmbeddingStore, StoreError, inspect_store
from gnaq_stream.stream.learner import StreamLearner

CFG = LearnerConfig(dim=16, bits=2, level_dtype="fp8", refine_steps=1)


def _stream(learner, n, start=0):
    return [Event(f"u{k % 7}", f"i{(k * 3) % 11}", float(k)) for k in range(start, start + n)]


def test_write_and_reload_round_trip(tmp_path):
    learner = StreamLearner(CFG)
    with EmbeddingStore(tmp_path / "s") as store:
        store.write(learner.initial_changes())
        for b in range(3):
            result = learner.apply_micro_batch(_stream(learner, 10, 10 * b))
            store.write(learner.changes(result, {("t", 0): 10 * (b + 1), ("t", 1): 5}))
    with EmbeddingStore(tmp_path / "s") as store:
        back = StreamLearner.from_state(store.load(LearnerConfig()))
        assert store.offsets() == {("t", 0): 30, ("t", 1): 5}
    assert back.cfg.dim == 16 and back.version == 3
    assert back.graph.users.external == learner.graph.users.external
    assert all(np.array_equal(a, b) for a, b in zip(back.graph.edges(), learner.graph.edges()))
    assert back.graph.n_events == 30
    n = learner.items.n
    assert np.array_equal(back.items.packed(np.arange(n)), learner.items.packed(np.arange(n)))
    assert np.array_equal(back.users.version[:learner.users.n], learner.users.version[:learner.users.n])


def test_inspect(tmp_path):
    learner = StreamLearner(CFG)
    with EmbeddingStore(tmp_path) as store:
        store.write(learner.initial_changes())
        store.write(learner.changes(learner.apply_micro_batch(_stream(learner, 20)), {("ev", 0): 20}))
        info = inspect_store(tmp_path)  # read-only snapshot beside the open writer
    assert (info["users"], info["items"], info["events"]) == (7, 11, 20)
    assert info["bytes_codes"] == 18 * 4 and info["bytes_levels"] == 18 * 4
    assert info["bytes_fp32"] == 18 * 64 and info["compression"] == pytest.approx(8.0)
    assert info["offsets"] == {"ev:0": 20} and info["model_version"] == 1


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no store here"):
        inspect_store(tmp_path / "nothing")


def test_a_store_of_another_format_is_refused_clearly(tmp_path):
    with EmbeddingStore(tmp_path) as store:
        store.write(StreamLearner(CFG).initial_changes())
        meta = store.model_meta()
        store.db.put(b"Mmodel", json.dumps({**meta, "format": "gnaq-stream-store/1"}).encode())
    with EmbeddingStore(tmp_path) as store, pytest.raises(StoreError, match="store format 'gnaq-stream-store/1'"):
        store.load(LearnerConfig())


@pytest.mark.parametrize("damage, message", [
    (lambda db: db.delete(b"u" + (3).to_bytes(4, "big")), "ids u are not indexed 0..5"),
    (lambda db: db.delete(b"I" + (0).to_bytes(4, "big")), "10 rows for 11 I nodes"),
    (lambda db: db.put(b"U" + (2).to_bytes(4, "big"), b"short"), "U rows of another size"),
])
def test_a_damaged_store_is_a_clear_error_not_a_wrong_model(tmp_path, damage, message):
    learner = StreamLearner(CFG)
    with EmbeddingStore(tmp_path) as store:
        store.write(learner.initial_changes())
        store.write(learner.changes(learner.apply_micro_batch(_stream(learner, 20)), {("ev", 0): 20}))
        damage(store.db)
        with pytest.raises(StoreError, match=message):
            store.load(LearnerConfig())
