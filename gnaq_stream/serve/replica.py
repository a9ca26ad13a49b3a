"""A serving replica's state: the records of the embedding-updates topic, kept in the replica's own
RocksDB store (so a restart serves at once) and in memory as packed rows for scoring.

Records are applied whole and one at a time, between requests (one event loop), so an answer never
sees half of a row, and a record older than the one held for its key is ignored (replays are safe).
A tombstone (no value) deletes its key, so a replica replaying a compacted topic holds only the model
the learner published last. A record the replica cannot apply raises `RejectedUpdate` and changes
nothing: undecodable, a row of another width than the model's, or an index beyond `max_nodes`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rocksdict import Options, Rdict, WriteBatch

from gnaq_stream.config import ServeConfig
from gnaq_stream.errors import ConfigError, GnaqError
from gnaq_stream.quant.packing import SUPPORTED_BITS, check_bits, check_level_dtype, row_bytes
from gnaq_stream.serve.scoring import ItemIndex, PackedScorer
from gnaq_stream.updates_format import META_KEY, HistoryUpdate, RowUpdate, UpdateFormatError, decode_meta, decode_update

log = logging.getLogger("gnaq_stream.serve")
REJECTION_REASONS = ("malformed", "width", "index", "partition")
MAX_DIM = 1 << 16  # a meta record's dim: the scorer allocates buffers of that size
MAX_ROW_BYTES = row_bytes(MAX_DIM, max(SUPPORTED_BITS), "fp32")  # bounds rows held before any meta record
_INT_BYTES = sys.getsizeof(1 << 24)  # a node index held as a Python int
_SHAPE = ("dim", "bits", "level_dtype")


class UnknownUser(GnaqError):
    """The user has no serving row (never seen, or not yet published)."""


class NotReady(GnaqError):
    """The replica has not received a model yet."""


class RejectedUpdate(ValueError):
    """A record the replica does not apply; `reason` is one of REJECTION_REASONS. Nothing held changed."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Rows:
    """Growable packed rows of one node kind, with versions and external ids. Item rows are held
    by the scorer's `ItemIndex` (in its layout); user rows as a plain array."""

    def __init__(self, width: int, index: ItemIndex | None = None):
        self.width, self.index = width, index
        self.rows = None if index is not None else np.zeros((64, width), dtype=np.uint8)
        self.versions = np.full(64, -1, dtype=np.int64)
        self.ids: list[str] = []
        self.n = 0  # highest index held + 1
        self.held = 0  # indices with a row
        self.id_bytes = 0  # sys.getsizeof of the ids held
        self._unpublished: np.ndarray | None = None

    def put(self, update: RowUpdate) -> str | None:
        """None if older than the row held at the index; else the external id held there before ("" if none)."""
        i = update.index
        if i >= len(self.versions):
            grow = max(i + 1, 2 * len(self.versions))
            self.versions = np.concatenate([self.versions, np.full(grow - len(self.versions), -1, dtype=np.int64)])
            if self.rows is not None:
                self.rows = np.concatenate([self.rows, np.zeros((grow - len(self.rows), self.width), dtype=np.uint8)])
        if update.version < self.versions[i]:
            return None
        row = np.frombuffer(update.row, dtype=np.uint8)
        if self.index is not None:
            self.index.put(np.array([i]), row[None, :])
        else:
            self.rows[i] = row
        self.held += int(self.versions[i] < 0)
        self.versions[i] = update.version
        self.ids.extend([""] * (i + 1 - len(self.ids)))
        previous = self.ids[i]
        self.id_bytes += sys.getsizeof(update.external_id) - (sys.getsizeof(previous) if previous else 0)
        self.ids[i] = update.external_id
        self.n = max(self.n, i + 1)
        self._unpublished = None
        return previous

    def drop(self, i: int, external_id: str) -> bool:
        """Forget the row at index i if it is the one of `external_id` (a tombstone of its key)."""
        if i >= self.n or self.versions[i] < 0 or self.ids[i] != external_id:
            return False
        self.versions[i] = -1
        self.id_bytes -= sys.getsizeof(external_id)
        self.ids[i] = ""
        self.held -= 1
        self._unpublished = None  # a dropped item is never scored: its bytes stay, excluded
        return True

    def indexed(self, index: ItemIndex) -> _Rows:
        """The same rows held by `index` (rows that arrived before the model's meta record)."""
        table = _Rows(self.width, index)
        held = np.flatnonzero(self.versions[:self.n] >= 0)
        index.put(held, self.rows[held])
        table.versions, table.ids, table.n, table.held, table.id_bytes = \
            self.versions, self.ids, self.n, self.held, self.id_bytes
        return table

    def unpublished(self) -> np.ndarray:
        """Indices below n without a row (a publication still arriving, or deleted)."""
        if self._unpublished is None:
            self._unpublished = np.flatnonzero(self.versions[:self.n] < 0)
        return self._unpublished

    def complete(self, n: int) -> bool:
        """Whether every index below n has a row."""
        return self.n >= n and not (self.unpublished() < n).any()

    @property
    def nbytes(self) -> int:
        return self.held * self.width

    @property
    def memory_bytes(self) -> int:
        rows = self.rows if self.index is None else self.index.data
        cache = 0 if self._unpublished is None else self._unpublished.nbytes
        return rows.nbytes + self.versions.nbytes + cache + sys.getsizeof(self.ids) + self.id_bytes


class Replica:
    def __init__(self, store: str | Path, max_nodes: int = ServeConfig.max_nodes):
        self.path = Path(store)
        self.max_nodes = max_nodes
        try:
            self.db = Rdict(str(self.path), options=Options(raw_mode=True))
        except Exception as exc:  # rocksdict raises plain Exception subclasses without a public base
            raise GnaqError(f"{self.path}: cannot open the replica store ({exc})") from None
        self.meta: dict | None = None
        self.scorer: PackedScorer | None = None
        self.users: _Rows | None = None
        self.items: _Rows | None = None
        self.user_index: dict[str, int] = {}
        self.histories: dict[int, tuple[int, np.ndarray]] = {}
        self.history_bytes = 0  # sys.getsizeof of the histories' keys, tuples, versions and arrays
        self._batch: WriteBatch | None = None  # persistence of the records being applied (apply_many)
        rejected = 0
        for key, value in self._stored():  # a restarted replica serves what it had before it reads the topic
            try:
                self._apply(key, value, persist=False)
            except RejectedUpdate:
                rejected += 1
        if rejected:
            log.warning("%s: %d stored records not loaded (they do not fit the stored model)", self.path, rejected)

    def _stored(self) -> Iterator[tuple[bytes, bytes]]:
        """The store's records, the meta record first so that rows are checked against it."""
        meta = self.db.get(META_KEY)
        if meta is not None:
            yield META_KEY, meta
        for key, value in self.db.items():
            if key != META_KEY:
                yield key, value

    def close(self) -> None:
        self.db.close()

    def apply(self, key: bytes, value: bytes | None) -> bool:
        """Apply one record of the updates topic; a value None or b"" is a tombstone, deleting its key.
        True if it changed what is held; False if older than the record held for its key, or a
        tombstone of something not held. Raises RejectedUpdate for a record that is not applied."""
        outcome = self.apply_many([(key, value)])[0]
        if isinstance(outcome, RejectedUpdate):
            raise outcome
        return outcome

    def apply_many(self, records: list[tuple[bytes, bytes | None]]) -> list[bool | RejectedUpdate]:
        """Apply records in order, persisted in one WriteBatch (a write per record cost more than the
        rest of applying it); per record what `apply` returns, or the RejectedUpdate it raises."""
        self._batch = WriteBatch(raw_mode=True)
        out: list[bool | RejectedUpdate] = []
        try:
            for key, value in records:
                try:
                    out.append(self._apply(key, value, persist=True))
                except RejectedUpdate as exc:
                    out.append(exc)
        finally:
            self.db.write(self._batch)
            self._batch = None
        return out

    def _apply(self, key: bytes, value: bytes | None, persist: bool) -> bool:
        if not value:
            return self._delete(key, persist)
        if key == META_KEY:
            try:
                meta = decode_meta(value)
            except (UpdateFormatError, RecursionError) as exc:  # the latter: JSON nested too deep
                raise RejectedUpdate("malformed", f"meta record: {exc}") from None
            fresh = self._apply_meta(meta)
        else:
            fresh = self._apply_record(_decode(key, value))
        if fresh and persist:
            self._batch.put(key, value)
        return fresh

    def _check_meta(self, meta: dict) -> None:
        try:
            check_bits(meta["bits"])
            check_level_dtype(meta["level_dtype"])
        except ConfigError as exc:
            raise RejectedUpdate("malformed", f"meta record: {exc}") from None
        if not 0 < meta["dim"] <= MAX_DIM or min(meta["n_users"], meta["n_items"]) < 0 \
                or not -1 <= meta["version"] < 1 << 63:
            raise RejectedUpdate("malformed", f"meta record: dim not in 1..{MAX_DIM}, a negative node count or a "
                                 "version outside -1..2^63-1")
        if max(meta["n_users"], meta["n_items"]) > self.max_nodes:
            raise RejectedUpdate("index", f"meta record: more than max_nodes={self.max_nodes} nodes of a kind")

    def _apply_meta(self, meta: dict) -> bool:
        self._check_meta(meta)
        same_shape = self.meta is not None and all(meta[k] == self.meta[k] for k in _SHAPE)
        if self.meta is not None and meta["model_id"] != self.meta["model_id"]:
            self._reset()  # another model (e.g. a learner started on a new store): its versions restart
            same_shape = False
        elif same_shape and meta["version"] < self.meta["version"]:
            return False
        if not same_shape:  # the first meta record, or a learner restarted with another --serve-bits
            width = row_bytes(meta["dim"], meta["bits"], meta["level_dtype"])
            index = ItemIndex(meta["dim"], meta["bits"], meta["level_dtype"])
            self.scorer = index.scorer
            # rows that came before the first meta record are kept if they fit (items move into the index)
            if self.meta is not None or self.users is None or self.users.width != width:
                self.users = _Rows(width)
                self.user_index.clear()
            fits = self.meta is None and self.items is not None and self.items.width == width
            self.items = self.items.indexed(index) if fits else _Rows(width, index)
        self.meta = meta
        return True

    def _reset(self) -> None:
        self.meta = self.scorer = self.users = self.items = None
        self.user_index.clear()
        self.histories.clear()
        self.history_bytes = 0
        if self._batch is not None:  # what came before the reset is written first, then wiped
            self.db.write(self._batch)
            self._batch = WriteBatch(raw_mode=True)
        self.db.delete_range(b"\x00", b"\xff")

    def _apply_record(self, update: RowUpdate | HistoryUpdate) -> bool:
        index = update.user if isinstance(update, HistoryUpdate) else update.index
        if index >= self.max_nodes:  # never allocated: a corrupt or hostile index
            raise RejectedUpdate("index", f"node index {index} >= max_nodes={self.max_nodes}")
        if isinstance(update, HistoryUpdate):
            held = self.histories.get(update.user)
            if held is not None and update.version < held[0]:
                return False
            self._drop_history(update.user)
            entry = (update.version, update.items)
            self.histories[update.user] = entry
            self.history_bytes += _history_bytes(entry)
            return True
        if update.version >= 1 << 63:  # versions are held as int64
            raise RejectedUpdate("malformed", f"version {update.version} out of range")
        previous = self._table_for(update).put(update)
        if previous is None:
            return False
        if update.kind == "user":
            self._unindex(previous, update.index)  # another id at this index: the old one is gone
            self.user_index[update.external_id] = update.index
        return True

    def _table_for(self, update: RowUpdate) -> _Rows:
        """The table a row goes to; RejectedUpdate if its width differs from the model's (the meta
        record's, or before any meta record that of the rows held)."""
        width, name = len(update.row), "users" if update.kind == "user" else "items"
        if self.meta is not None:
            expected = self.users.width
        else:
            expected = next((t.width for t in (self.users, self.items) if t is not None and t.held), None)
        if expected is not None and width != expected:
            raise RejectedUpdate("width", f"{update.kind} row of {width} bytes, the model's rows have {expected}")
        if not 0 < width <= MAX_ROW_BYTES:
            raise RejectedUpdate("width", f"{update.kind} row of {width} bytes, no model's rows have that")
        table = getattr(self, name)
        if table is None or table.width != width:
            table = _Rows(width)  # rows may precede the first meta record
            setattr(self, name, table)
        return table

    def _delete(self, key: bytes, persist: bool) -> bool:
        if key == META_KEY:
            raise RejectedUpdate("malformed", "a tombstone of the meta record")
        update = _decode(key, bytes(8))  # a tombstone has no value: decode its key with an empty one
        if isinstance(update, HistoryUpdate):
            dropped = self._drop_history(update.user)
        else:
            table = self.users if update.kind == "user" else self.items
            dropped = table is not None and table.drop(update.index, update.external_id)
            if dropped and update.kind == "user":
                self._unindex(update.external_id, update.index)
        if persist:
            self._batch.delete(key)
        return dropped

    def _unindex(self, user: str, index: int) -> None:
        if self.user_index.get(user) == index:
            del self.user_index[user]

    def _drop_history(self, user: int) -> bool:
        held = self.histories.pop(user, None)
        if held is not None:
            self.history_bytes -= _history_bytes(held)
        return held is not None

    @property
    def ready(self) -> bool:
        """Whether a complete model is held: a meta record of version >= 0 and a row for every index
        below its n_users and n_items."""
        return self.model_version >= 0 and self.users.complete(self.meta["n_users"]) \
            and self.items.complete(self.meta["n_items"])

    @property
    def model_version(self) -> int:
        return -1 if self.meta is None else self.meta["version"]

    @property
    def model_bytes(self) -> int:
        """Bytes of the packed rows held (row width x rows)."""
        return sum(t.nbytes for t in (self.users, self.items) if t is not None)

    @property
    def memory_bytes(self) -> int:
        """Estimate of the memory held: row arrays (as allocated), versions, ids, the user index and
        histories, Python object overheads included."""
        tables = sum(t.memory_bytes for t in (self.users, self.items) if t is not None)
        user_index = sys.getsizeof(self.user_index) + _INT_BYTES * len(self.user_index)  # keys are the ids
        return tables + user_index + sys.getsizeof(self.histories) + self.history_bytes

    def recommend(self, user: str, k: int) -> dict:
        """Top-k items for an external user id, the user's own items excluded."""
        if self.meta is None:  # with a meta record come both tables, items in the index
            raise NotReady("no model received yet")
        idx = self.user_index.get(user)
        if idx is None:
            raise UnknownUser(f"unknown user {user!r}")
        vector = self.scorer.user_vector(self.users.rows[idx])
        _, history = self.histories.get(idx, (0, np.zeros(0, dtype=np.int64)))
        # rows of a publication still arriving are served already; items not yet arrived are skipped
        best, best_scores = self.items.index.top_k(vector, k, np.concatenate([history, self.items.unpublished()]))
        return {"user": user, "k": k, "model_version": self.model_version,
                "user_version": int(self.users.versions[idx]),
                "items": [{"item": self.items.ids[i], "score": float(s)} for i, s in zip(best.tolist(), best_scores)]}

    def info(self) -> dict:
        return {"model_version": self.model_version, "users": 0 if self.users is None else self.users.held,
                "items": 0 if self.items is None else self.items.held, "model_bytes": self.model_bytes,
                "meta": self.meta}


def _decode(key: bytes, value: bytes) -> RowUpdate | HistoryUpdate:
    try:
        return decode_update(key, value)
    except UpdateFormatError as exc:
        raise RejectedUpdate("malformed", str(exc)) from None


def _history_bytes(entry: tuple[int, np.ndarray]) -> int:
    return _INT_BYTES + sys.getsizeof(entry) + sys.getsizeof(entry[0]) + sys.getsizeof(entry[1])
