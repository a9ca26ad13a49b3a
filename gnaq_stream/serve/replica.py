"""A serving replica's state: the records of the embedding-updates topic, kept in the replica's own
RocksDB store (so a restart serves at once) and in memory as packed rows for scoring.

Records are applied whole and one at a time, between requests (one event loop), so an answer never
sees half of a row, and a record older than the one held for its key is ignored (replays are safe).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rocksdict import Options, Rdict

from gnaq_stream.errors import GnaqError
from gnaq_stream.quant.packing import row_bytes
from gnaq_stream.serve.scoring import ItemIndex, PackedScorer
from gnaq_stream.updates_format import HistoryUpdate, RowUpdate, decode_meta, decode_update


class UnknownUser(GnaqError):
    """The user has no serving row (never seen, or not yet published)."""


class NotReady(GnaqError):
    """The replica has not received a model yet."""


class _Rows:
    """Growable packed rows of one node kind, with versions and external ids. Item rows are held
    by the scorer's `ItemIndex` (in its layout); user rows as a plain array."""

    def __init__(self, width: int, index: ItemIndex | None = None):
        self.width, self.index = width, index
        self.rows = None if index is not None else np.zeros((1024, width), dtype=np.uint8)
        self.versions = np.full(1024, -1, dtype=np.int64)
        self.ids: list[str] = []
        self.n = 0
        self._unpublished: np.ndarray | None = None

    def put(self, update: RowUpdate) -> bool:
        i = update.index
        if i >= len(self.versions):
            grow = max(i + 1, 2 * len(self.versions))
            self.versions = np.concatenate([self.versions, np.full(grow - len(self.versions), -1, dtype=np.int64)])
            if self.rows is not None:
                self.rows = np.concatenate([self.rows, np.zeros((grow - len(self.rows), self.width), dtype=np.uint8)])
        if update.version < self.versions[i]:
            return False
        row = np.frombuffer(update.row, dtype=np.uint8)
        if self.index is not None:
            self.index.put(np.array([i]), row[None, :])
        else:
            self.rows[i] = row
        self.versions[i] = update.version
        self.ids.extend([""] * (i + 1 - len(self.ids)))
        self.ids[i] = update.external_id
        self.n = max(self.n, i + 1)
        self._unpublished = None
        return True

    def indexed(self, index: ItemIndex) -> _Rows:
        """The same rows held by `index` (rows that arrived before the model's meta record)."""
        table = _Rows(self.width, index)
        if self.rows is not None:
            held = np.flatnonzero(self.versions[:self.n] >= 0)
            index.put(held, self.rows[held])
        table.versions, table.ids, table.n = self.versions, self.ids, self.n
        return table

    def unpublished(self) -> np.ndarray:
        """Indices below n without a row yet (a publication still arriving)."""
        if self._unpublished is None:
            self._unpublished = np.flatnonzero(self.versions[:self.n] < 0)
        return self._unpublished

    @property
    def nbytes(self) -> int:
        return self.n * self.width


class Replica:
    def __init__(self, store: str | Path):
        self.path = Path(store)
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
        it = self.db.iter()
        it.seek_to_first()
        while it.valid():  # a restarted replica serves what it had before it reads the topic again
            self._apply(it.key(), it.value(), persist=False)
            it.next()

    def close(self) -> None:
        self.db.close()

    def apply(self, key: bytes, value: bytes) -> bool:
        """Apply one record of the updates topic; False if it was older than what is held.
        Raises UpdateFormatError (a ValueError) for a record that cannot be decoded."""
        return self._apply(key, value, persist=True)

    def _apply(self, key: bytes, value: bytes, persist: bool) -> bool:
        if key == b"M":
            fresh = self._apply_meta(decode_meta(value))
        else:
            fresh = self._apply_record(decode_update(key, value))
        if fresh and persist:
            self.db[key] = value
        return fresh

    def _apply_meta(self, meta: dict) -> bool:
        shape = ("dim", "bits", "level_dtype")
        if self.meta is not None and meta["model_id"] != self.meta["model_id"]:
            self._reset()  # another model (e.g. a learner started on a new store): its versions restart
        elif self.meta is not None and meta["version"] < self.meta["version"]:
            return False
        if self.meta is None or any(meta[k] != self.meta[k] for k in shape):
            width = row_bytes(meta["dim"], meta["bits"], meta["level_dtype"])
            index = ItemIndex(meta["dim"], meta["bits"], meta["level_dtype"])
            self.scorer = index.scorer
            # rows that came before this meta record are kept if they fit (items move into the index)
            if self.users is None or self.users.width != width:
                self.users = _Rows(width)
            fits = self.items is not None and self.items.width == width and self.items.index is None
            self.items = self.items.indexed(index) if fits else _Rows(width, index)
        self.meta = meta
        return True

    def _reset(self) -> None:
        self.meta = self.scorer = self.users = self.items = None
        self.user_index.clear()
        self.histories.clear()
        self.db.delete_range(b"\x00", b"\xff")

    def _apply_record(self, update: RowUpdate | HistoryUpdate) -> bool:
        if isinstance(update, HistoryUpdate):
            held = self.histories.get(update.user)
            if held is not None and update.version < held[0]:
                return False
            self.histories[update.user] = (update.version, update.items)
            return True
        table_name = "users" if update.kind == "user" else "items"
        table = getattr(self, table_name)
        if table is None or table.width != len(update.row):
            table = _Rows(len(update.row))  # rows may precede the first meta record
            setattr(self, table_name, table)
        fresh = table.put(update)
        if fresh and update.kind == "user":
            self.user_index[update.external_id] = update.index
        return fresh

    @property
    def model_version(self) -> int:
        return -1 if self.meta is None else self.meta["version"]

    @property
    def model_bytes(self) -> int:
        return sum(t.nbytes for t in (self.users, self.items) if t is not None)

    def recommend(self, user: str, k: int) -> dict:
        """Top-k items for an external user id, the user's own items excluded."""
        if self.meta is None or self.items is None or self.users is None or self.items.index is None:
            raise NotReady("no model received yet")  # or only rows that do not fit the model's meta record
        idx = self.user_index.get(user)
        if idx is None or self.users.versions[idx] < 0:
            raise UnknownUser(f"unknown user {user!r}")
        vector = self.scorer.user_vector(self.users.rows[idx])
        _, history = self.histories.get(idx, (0, np.zeros(0, dtype=np.int64)))
        # rows of a publication still arriving are served already; items not yet arrived are skipped
        best, best_scores = self.items.index.top_k(vector, k, np.concatenate([history, self.items.unpublished()]))
        return {"user": user, "k": k, "model_version": self.model_version,
                "user_version": int(self.users.versions[idx]),
                "items": [{"item": self.items.ids[i], "score": float(s)} for i, s in zip(best.tolist(), best_scores)]}

    def info(self) -> dict:
        return {"model_version": self.model_version, "users": 0 if self.users is None else self.users.n,
                "items": 0 if self.items is None else self.items.n, "model_bytes": self.model_bytes,
                "meta": self.meta}
