"""The embedding-updates topic: how one learner feeds any number of serving replicas.

Records (key -> value; integers in keys big-endian so they sort, in values little-endian):
    b"M"                  JSON {"format", "model_id", "dim", "bits", "level_dtype", "version", "n_users",
                          "n_items"}: sent after each publication, so a replica knows which learner
                          version it has completely received; a learner's first publication also
                          starts with one (version -1), so a replica meeting a new model id starts
                          over before that model's rows arrive
    b"U" / b"I" + u32 idx + external id (UTF-8)
                          u64 version | serving row (packed, gnaq_stream.quant.packing)
    b"H" + u32 user idx   u64 version | u32 item indices of everything the user interacted with

Serving rows are the final (propagated) embeddings quantized node-wise (gnaq_stream.serve.scoring).
Every record is the whole current value for its key, so a compacted topic holds the full model and
replaying records is idempotent: a replica keeps, per key, the record with the highest version.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
from kafka import KafkaProducer

from gnaq_stream.serve.scoring import quantize_rows
from gnaq_stream.stream.learner import StreamLearner

UPDATES_FORMAT = "gnaq-updates/1"
_U32 = struct.Struct(">I")
_VERSION = struct.Struct("<Q")


@dataclass(frozen=True)
class RowUpdate:
    kind: str  # "user" or "item"
    index: int
    version: int
    row: bytes
    external_id: str


@dataclass(frozen=True)
class HistoryUpdate:
    user: int
    version: int
    items: np.ndarray


class UpdateFormatError(ValueError):
    """A record on the updates topic that this version cannot decode."""


def row_key(kind: str, index: int, external_id: str) -> bytes:
    return (b"U" if kind == "user" else b"I") + _U32.pack(index) + external_id.encode()


def decode_meta(value: bytes) -> dict:
    meta = json.loads(value)
    if meta.get("format") != UPDATES_FORMAT:
        raise UpdateFormatError(f"unknown updates format {meta.get('format')!r}")
    return meta


def decode_update(key: bytes, value: bytes) -> RowUpdate | HistoryUpdate:
    """A row or history record (the meta record is read with `decode_meta`)."""
    kind = key[:1]
    if kind not in (b"U", b"I", b"H") or len(key) < 5 or len(value) < _VERSION.size:
        raise UpdateFormatError(f"not an update record: key {key[:16]!r}")
    index = _U32.unpack(key[1:5])[0]
    version = _VERSION.unpack_from(value)[0]
    body = value[_VERSION.size:]
    if kind == b"H":
        if len(key) != 5 or len(body) % 4:
            raise UpdateFormatError("history record with a malformed key or a partial item index")
        return HistoryUpdate(index, version, np.frombuffer(body, dtype="<u4").astype(np.int64))
    try:
        external_id = key[5:].decode()
    except UnicodeDecodeError:
        raise UpdateFormatError(f"row record whose external id is not UTF-8: {key[:16]!r}") from None
    return RowUpdate("user" if kind == b"U" else "item", index, version, body, external_id)


class UpdatesPublisher:
    """Publishes what changed since the last publication. What was sent is remembered only once the
    producer has flushed it, so a failed publication is repeated in full by the next call."""

    def __init__(self, producer: KafkaProducer, topic: str, serve_bits: int):
        self.producer, self.topic, self.serve_bits = producer, topic, serve_bits
        self.sent = {"user": np.zeros((0, 0), dtype=np.uint8), "item": np.zeros((0, 0), dtype=np.uint8)}
        self.published_version = -1

    def publish(self, learner: StreamLearner, users: np.ndarray) -> int:
        """Histories of `users`, then, if the learner propagated since the last call, its changed
        serving rows and the meta record; flushed. Returns how many rows were sent."""
        if self.published_version < 0:  # first publication: announce the model before anything of it
            self.producer.send(self.topic, key=b"M", value=json.dumps(self._meta(learner, -1)).encode())
        version = _VERSION.pack(learner.version)
        for u in users.tolist():
            items = np.asarray(learner.graph.user_items[u], dtype="<u4")
            self.producer.send(self.topic, key=b"H" + _U32.pack(u), value=version + items.tobytes())
        fresh, count = {}, 0
        if learner.final_version != self.published_version:
            fresh, count = self._send_rows(learner)
        self.producer.flush(timeout=30)
        if fresh:
            self.sent.update(fresh)
            self.published_version = learner.final_version
        return count

    def _send_rows(self, learner: StreamLearner) -> tuple[dict[str, np.ndarray], int]:
        cfg, g = learner.cfg, learner.graph
        version = _VERSION.pack(learner.final_version)
        fresh, count = {}, 0
        for kind, final, ids in (("user", learner.final_users, g.users.external),
                                 ("item", learner.final_items, g.items.external)):
            rows = quantize_rows(final, self.serve_bits, cfg.level_dtype)
            before = self.sent[kind]
            changed = np.ones(len(rows), dtype=bool)
            if before.shape[1] == rows.shape[1]:
                common = min(len(before), len(rows))
                changed[:common] = (before[:common] != rows[:common]).any(axis=1)
            for idx in np.flatnonzero(changed).tolist():
                self.producer.send(self.topic, key=row_key(kind, idx, ids[idx]), value=version + rows[idx].tobytes())
            fresh[kind] = rows
            count += int(changed.sum())
        meta = self._meta(learner, learner.final_version)
        self.producer.send(self.topic, key=b"M", value=json.dumps(meta).encode())
        return fresh, count

    def _meta(self, learner: StreamLearner, version: int) -> dict:
        cfg = learner.cfg
        return {"format": UPDATES_FORMAT, "model_id": learner.model_id, "dim": cfg.dim, "bits": self.serve_bits,
                "level_dtype": cfg.level_dtype, "version": version, "n_users": len(learner.final_users),
                "n_items": len(learner.final_items)}
