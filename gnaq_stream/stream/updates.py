"""Publishing the learner's serving rows and histories to the embedding-updates topic (wire format:
gnaq_stream.updates_format). Serving rows are the final (propagated) embeddings quantized node-wise."""

from __future__ import annotations

import logging

import numpy as np
from kafka import KafkaProducer

from gnaq_stream.quant.packing import quantize_rows
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.stream.sending import Record, send_all
from gnaq_stream.updates_format import (BLOCK_HEAD_BYTES, BLOCK_ROWS, block_record, history_block_record,
                                        history_record, meta_record, row_record)

log = logging.getLogger("gnaq_stream.updates")
# a history record must fit Kafka's default 1 MB request: the most recent items of a heavier user
MAX_HISTORY_ITEMS = 200_000
# a block where at least this many rows (histories) changed is sent as one block record (at most 8x the
# bytes of its changed rows, for up to 256x fewer records), the other changed rows one record each
DENSE_BLOCK_ROWS = BLOCK_ROWS // 8
MAX_BLOCK_BYTES = 900_000  # below Kafka's default 1 MB message limit


class UpdatesPublisher:
    """Publishes what changed since the last publication. What was sent is remembered only once every
    record was acknowledged, so a failed publication is repeated in full by the next call."""

    def __init__(self, producer: KafkaProducer, topic: str, serve_bits: int, stale_keys: list[bytes] = ()):
        self.producer, self.topic, self.serve_bits = producer, topic, serve_bits
        self.sent = {"user": np.zeros((0, 0), dtype=np.uint8), "item": np.zeros((0, 0), dtype=np.uint8)}
        self.published_version = -1
        self.stale_keys = list(stale_keys)  # another model's keys, deleted before this model's first record

    def publish(self, learner: StreamLearner, users: np.ndarray, new_nodes: tuple[np.ndarray, np.ndarray] | None = None
                ) -> int:
        """Histories of `users`; then, if the learner propagated since the last call, its changed
        serving rows and the meta record; then the current rows of `new_nodes` (users, items added
        since the last call: answered without waiting for the next propagation), at the learner's
        version. All acknowledged or a KafkaError. Returns rows sent."""
        records: list[Record] = []
        if self.published_version < 0:  # first publication: retire the old model, announce this one
            records += [(self.topic, key, None, None) for key in self.stale_keys]
            records.append((self.topic, *meta_record(self._meta(learner, -1)), None))
        records += self._history_records(learner, np.asarray(users, dtype=np.int64))
        fresh, count = {}, 0
        if learner.final_version != self.published_version:
            fresh, rows, count = self._rows(learner)
            records += rows
        held = {**self.sent, **fresh}  # what the replicas hold once the records above arrive
        none = np.zeros(0, dtype=np.int64)
        touched = self._touched_rows(learner, *(new_nodes or (none, none)), held)
        for kind, (idx, rows) in touched.items():
            records += self._row_records(learner, kind, idx, rows, learner.version)
            count += len(idx)
        send_all(self.producer, records)
        self.stale_keys = []
        if fresh:
            self.published_version = learner.final_version
        self.sent = held
        for kind, (idx, rows) in touched.items():
            self._remember(kind, idx, rows)
        return count

    def _history_records(self, learner: StreamLearner, users: np.ndarray) -> list[Record]:
        """The histories of `users`: a history block record for each block where at least
        DENSE_BLOCK_ROWS of them are (one record per user of a micro-batch touching thousands cost the
        learner ~40% of its time at 20,000 events/s on gowalla: kafka-python's cost is per record), a
        history record for each other user."""
        graph, version = learner.graph, learner.version
        blocks, counts = np.unique(users // BLOCK_ROWS, return_counts=True)
        dense = blocks[counts >= DENSE_BLOCK_ROWS]
        sizes = np.minimum(BLOCK_ROWS, graph.n_users - dense * BLOCK_ROWS)
        members = _block_members(dense, sizes)
        if len(dense):  # a block too big for one record (heavy users) goes user by user
            degrees = graph.user_degrees(members)
            fits = BLOCK_HEAD_BYTES + 4 * sizes + 4 * np.add.reduceat(degrees, np.cumsum(sizes) - sizes) \
                <= MAX_BLOCK_BYTES
            members, dense, sizes = members[np.repeat(fits, sizes)], dense[fits], sizes[fits]
        singles = users[~np.isin(users // BLOCK_ROWS, dense)]
        owner, items = graph.items_of_users(np.concatenate([members, singles]))
        lengths = np.bincount(owner, minlength=len(members) + len(singles))
        ends = np.cumsum(lengths)
        records, lo = [], 0
        for block, n in zip(dense.tolist(), sizes.tolist()):
            records.append((self.topic, *history_block_record(block, version, lengths[lo:lo + n],
                                                              items[ends[lo] - lengths[lo]:ends[lo + n - 1]]), None))
            lo += n
        head = int(lengths[:len(members)].sum())  # the members' items come first
        for u, history in zip(singles.tolist(), np.split(items[head:], ends[len(members):-1] - head)):
            if len(history) > MAX_HISTORY_ITEMS:
                log.warning("user %s has %d items: only the %d newest in the catalogue are published as the "
                            "history replicas exclude", graph.users.external[u], len(history), MAX_HISTORY_ITEMS)
                history = np.sort(history)[-MAX_HISTORY_ITEMS:]
            records.append((self.topic, *history_record(u, version, history), None))
        return records

    def _touched_rows(self, learner: StreamLearner, users: np.ndarray, items: np.ndarray,
                      held: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Serving rows of these nodes as of now (`StreamLearner.current_final`) that differ from the
        rows `held`: kind -> (indices, packed rows)."""
        if not len(users) and not len(items):
            return {}
        final_u, final_i = learner.current_final(users, items)
        out = {}
        for kind, idx, final in (("user", users, final_u), ("item", items, final_i)):
            rows = quantize_rows(final, self.serve_bits, learner.cfg.level_dtype)
            changed = _changed(held[kind], idx, rows)
            out[kind] = (idx[changed], rows[changed])
        return out

    def _remember(self, kind: str, idx: np.ndarray, rows: np.ndarray) -> None:
        """What the replicas now hold for these nodes (compared against at the next publication)."""
        if not len(idx):
            return
        held = self.sent[kind]
        if held.shape[1] != rows.shape[1]:
            held = np.zeros((0, rows.shape[1]), dtype=np.uint8)
        if idx.max() >= len(held):
            held = np.concatenate([held, np.zeros((idx.max() + 1 - len(held), rows.shape[1]), dtype=np.uint8)])
        held[idx] = rows
        self.sent[kind] = held

    def _rows(self, learner: StreamLearner) -> tuple[dict[str, np.ndarray], list[Record], int]:
        """Changed serving rows of both kinds, then the meta record that completes them; and how many rows."""
        fresh, records, count = {}, [], 0
        for kind, final in (("user", learner.final_users), ("item", learner.final_items)):
            rows = quantize_rows(final, self.serve_bits, learner.cfg.level_dtype)
            idx = np.flatnonzero(_changed(self.sent[kind], np.arange(len(rows)), rows))
            records += self._changed_records(learner, kind, idx, rows, learner.final_version)
            fresh[kind], count = rows, count + len(idx)
        records.append((self.topic, *meta_record(self._meta(learner, learner.final_version)), None))
        return fresh, records, count

    def _changed_records(self, learner: StreamLearner, kind: str, idx: np.ndarray, rows: np.ndarray,
                         version: int) -> list[Record]:
        """Records for the changed nodes `idx` of `rows` (every node's row of that kind, in index order):
        a block record for each block dense in changes, a row record for each other changed node."""
        ids = learner.graph.users if kind == "user" else learner.graph.items
        blocks, counts = np.unique(idx // BLOCK_ROWS, return_counts=True)
        records, sent = [], []
        for block in blocks[counts >= DENSE_BLOCK_ROWS].tolist():
            lo, hi = block * BLOCK_ROWS, min((block + 1) * BLOCK_ROWS, len(rows))
            names, lengths = ids.encoded(lo, hi)
            if rows[lo:hi].nbytes + len(names) <= MAX_BLOCK_BYTES:  # else (wide rows, long ids) row by row
                records.append((self.topic, *block_record(kind, block, version, names, lengths, rows[lo:hi]), None))
                sent.append(block)
        single = idx[~np.isin(idx // BLOCK_ROWS, sent)]
        return records + self._row_records(learner, kind, single, rows[single], version)

    def _row_records(self, learner: StreamLearner, kind: str, idx: np.ndarray, rows: np.ndarray,
                     version: int) -> list[Record]:
        ids = (learner.graph.users if kind == "user" else learner.graph.items).external
        return [(self.topic, *row_record(kind, i, ids[i], version, row.tobytes()), None)
                for i, row in zip(idx.tolist(), rows)]

    def _meta(self, learner: StreamLearner, version: int) -> dict:
        cfg = learner.cfg
        return {"model_id": learner.model_id, "dim": cfg.dim, "bits": self.serve_bits, "level_dtype": cfg.level_dtype,
                "version": version, "n_users": learner.context_users, "n_items": learner.final_items_t.shape[1]}


def _block_members(blocks: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The node indices of these blocks, `sizes` nodes each from the block's first, in order."""
    first = np.cumsum(sizes) - sizes
    return np.repeat(blocks * BLOCK_ROWS - first, sizes) + np.arange(int(sizes.sum()))


def _changed(held: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which of the nodes `idx` have `rows` other than the ones `held` (all, if held has another width)."""
    changed = np.ones(len(idx), dtype=bool)
    if held.shape[1] == rows.shape[1]:
        known = idx < len(held)
        changed[known] = (held[idx[known]] != rows[known]).any(axis=1)
    return changed
