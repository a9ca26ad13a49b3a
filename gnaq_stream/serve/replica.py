"""A serving replica's state: the records of the embedding-updates topic, kept in the replica's own
RocksDB store (so a restart serves at once) and in memory as packed rows for scoring.

Records are applied whole, in order, between requests (one event loop), so an answer never sees half
of a row, and a record older than the one held for its key is ignored (replays are safe). A
tombstone (no value) deletes its key, so a replica replaying a compacted topic holds only the model
the learner published last. A record the replica cannot apply raises `RejectedUpdate` and changes
nothing: undecodable, a row of another width than the model's, or an index beyond `max_nodes`.

`apply_many` applies a batch as one (a block record as the row records it stands for): rows of the
model's width are decoded and written with array operations (one WriteBatch, one `ItemIndex.put`),
with the same outcome per record as one by one.
Memory per node is its packed row, a version (u32 while versions fit) and its external id in one
byte buffer (offset + length prefix); users also have an open-addressing hash slot (id -> index).
Histories are not held in memory: a request reads its user's history record and history block record
from the store (one multi-get) and takes the newer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numba
import numpy as np
from rocksdict import Options, Rdict, WriteBatch

from gnaq_stream.config import ServeConfig
from gnaq_stream.errors import ConfigError, GnaqError
from gnaq_stream.quant.packing import SUPPORTED_BITS, check_bits, check_level_dtype, row_bytes
from gnaq_stream.serve.scoring import ItemIndex, PackedScorer
from gnaq_stream.updates_format import (META_KEY, RowUpdate, UpdateFormatError, decode_meta, decode_rows,
                                        decode_update, expand_block, history_block_key, history_key, history_span,
                                        user_history)

log = logging.getLogger("gnaq_stream.serve")
REJECTION_REASONS = ("malformed", "width", "index", "partition")
MAX_DIM = 1 << 16  # a meta record's dim: the scorer allocates buffers of that size
MAX_ROW_BYTES = row_bytes(MAX_DIM, max(SUPPORTED_BITS), "fp32")  # bounds rows held before any meta record
MAX_ID_BYTES = 1024  # 256 characters (the learner's limit) of up to 4 UTF-8 bytes each
_SHAPE = ("dim", "bits", "level_dtype")
_EMPTY, _DELETED = -1, -2  # hash slots
# hash slots in use (deleted included) over slots: never above _MAX_LOAD (probes stay short); a table
# sized for a meta record's count starts at _RESERVED_LOAD once that many arrived, one grown starts at _GROWN_LOAD
_MAX_LOAD, _RESERVED_LOAD, _GROWN_LOAD = 0.8, 0.78, 0.65


class UnknownUser(GnaqError):
    """The user has no serving row (never seen, or not yet published)."""


class NotReady(GnaqError):
    """The replica has not received a model yet."""


class RejectedUpdate(ValueError):
    """A record the replica does not apply; `reason` is one of REJECTION_REASONS. Nothing held changed."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@numba.njit(cache=True, inline="always")
def _id_at(buf: np.ndarray, starts: np.ndarray, i: int) -> tuple[int, int]:
    """(offset, length) of node i's id: a 1-byte length prefix below 128, else 2 bytes."""
    p = np.int64(starts[i])  # u64 starts would turn arithmetic into float64
    b = np.int64(buf[p])
    if b < 128:
        return p + 1, b
    return p + 2, ((b & 0x7F) << 8) | buf[p + 1]


@numba.njit(cache=True, inline="always")
def _id_size(buf: np.ndarray, starts: np.ndarray, i: int) -> int:
    """Bytes node i's id takes in the buffer, its prefix included."""
    s, n = _id_at(buf, starts, i)
    return s + n - np.int64(starts[i])


@numba.njit(cache=True, inline="always")
def _hash(buf: np.ndarray, at: int, n: int) -> np.uint64:
    h = np.uint64(14695981039346656037)  # FNV-1a
    for j in range(n):
        h = (h ^ np.uint64(buf[at + j])) * np.uint64(1099511628211)
    return h


@numba.njit(cache=True)
def _find(slots: np.ndarray, buf: np.ndarray, starts: np.ndarray, q: np.ndarray, at: int, n: int) -> int:
    """Slot holding the id q[at:at+n], or -1."""
    cap = len(slots)
    p = np.int64(_hash(q, at, n) % np.uint64(cap))
    while True:
        v = slots[p]
        if v == _EMPTY:
            return -1
        if v >= 0:
            s, m = _id_at(buf, starts, v)
            if m == n:
                same = True
                for j in range(n):
                    if buf[s + j] != q[at + j]:
                        same = False
                        break
                if same:
                    return p
        p = (p + 1) % cap


@numba.njit(cache=True)
def _insert(slots: np.ndarray, buf: np.ndarray, starts: np.ndarray, i: int) -> int:
    """Map node i's id to i (replacing another index it mapped to); 1 if an empty slot was used."""
    s, n = _id_at(buf, starts, i)
    found = _find(slots, buf, starts, buf, s, n)
    if found >= 0:
        slots[found] = i
        return 0
    cap = len(slots)
    p = np.int64(_hash(buf, s, n) % np.uint64(cap))
    while slots[p] >= 0:
        p = (p + 1) % cap
    used = 1 if slots[p] == _EMPTY else 0
    slots[p] = i
    return used


@numba.njit(cache=True)
def _unindex(slots: np.ndarray, buf: np.ndarray, starts: np.ndarray, i: int) -> None:
    """Forget node i's id if it maps to i."""
    s, n = _id_at(buf, starts, i)
    found = _find(slots, buf, starts, buf, s, n)
    if found >= 0 and slots[found] == i:
        slots[found] = _DELETED


@numba.njit(cache=True)
def _put(idx: np.ndarray, vers: np.ndarray, locs: np.ndarray, versions: np.ndarray, starts: np.ndarray,
         buf: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """Apply rows in order: record r (node idx[r], version vers[r] + 1, id at buf[locs[r]]) is taken
    unless older than what is held then. Returns (taken, nodes newly held, id buffer bytes now live
    minus before, hash slots newly used)."""
    taken = np.zeros(len(idx), dtype=np.bool_)
    held, live, used = 0, 0, 0
    for r in range(len(idx)):
        i = idx[r]
        if vers[r] < versions[i]:
            continue
        taken[r] = True
        if versions[i] > 0:
            live -= _id_size(buf, starts, i)
            if len(slots):
                _unindex(slots, buf, starts, i)
        else:
            held += 1
        versions[i] = vers[r]
        starts[i] = locs[r]
        live += _id_size(buf, starts, i)
        if len(slots):
            used += _insert(slots, buf, starts, i)
    return taken, held, live, used


@numba.njit(cache=True)
def _new_ids(idx: np.ndarray, locs: np.ndarray, versions: np.ndarray, starts: np.ndarray, buf: np.ndarray) -> int:
    """How many records would put an id not held at their index: at most that many slots get used."""
    count = 0
    for r in range(len(idx)):
        i = idx[r]
        if versions[i] == 0:
            count += 1
            continue
        s, n = _id_at(buf, starts, i)
        q, m = _id_at(buf, locs, r)
        if n != m:
            count += 1
            continue
        for j in range(n):
            if buf[s + j] != buf[q + j]:
                count += 1
                break
    return count


@numba.njit(cache=True)
def _rehash(slots: np.ndarray, buf: np.ndarray, starts: np.ndarray, versions: np.ndarray, n: int) -> None:
    for i in range(n):
        if versions[i] > 0:
            _insert(slots, buf, starts, i)


@numba.njit(cache=True)
def _compact(buf: np.ndarray, starts: np.ndarray, versions: np.ndarray, n: int, out: np.ndarray) -> int:
    """Copy the held nodes' ids (with prefixes) to `out`, re-pointing `starts`; bytes used."""
    at = 0
    for i in range(n):
        if versions[i] > 0:
            p, size = np.int64(starts[i]), _id_size(buf, starts, i)
            out[at:at + size] = buf[p:p + size]
            starts[i] = at
            at += size
    return at


def _grown(array: np.ndarray, n: int) -> np.ndarray:
    """`array` with at least n entries (first axis): 1/16 more than asked, so growing is amortised and
    what is allocated stays near what is held."""
    if n <= len(array):
        return array
    out = np.zeros((n + n // 16 + 16,) + array.shape[1:], dtype=array.dtype)
    out[:len(array)] = array
    return out


def _prefixed(ids: list[bytes]) -> tuple[bytes, np.ndarray]:
    """Ids with their length prefixes, concatenated, and where each starts."""
    parts = [(len(b).to_bytes(1) if len(b) < 128 else (len(b) | 0x8000).to_bytes(2)) + b for b in ids]
    sizes = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    return b"".join(parts), np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(parts) else sizes


class _Rows:
    """Packed rows of one node kind with versions and external ids. Item rows are held by the
    scorer's `ItemIndex` (in its layout); user rows as a plain array, with an id -> index hash table.

    `versions[i]` is the version held at i plus one (0: none), u32 until a version does not fit."""

    def __init__(self, width: int, index: ItemIndex | None = None, lookup: type | None = None):
        self.width, self.index = width, index
        self.rows = None if index is not None else np.zeros((0, width), dtype=np.uint8)
        self.versions = np.zeros(0, dtype=np.uint32)
        self.starts = np.zeros(0, dtype=np.uint32)  # offset of each node's id in `ids`
        self.ids = np.zeros(0, dtype=np.uint8)
        self.ids_used = self.ids_live = 0  # bytes written to `ids`, and those of the ids held
        # users: hash slots holding node indices (int32 unless max_nodes needs more); items: none
        self.slots = np.full(64 if lookup else 0, _EMPTY, dtype=lookup or np.int32)
        self.slots_used = 0  # slots not empty (deleted ones included)
        self.n = 0  # highest index held + 1
        self.held = 0  # indices with a row
        self._unpublished: np.ndarray | None = None

    def reserve(self, n: int) -> None:
        """Room for n nodes (a meta record says how many come), so tables are not grown one batch at a time."""
        if n > len(self.versions):
            self._grow_to(n, exact=True)
            if self.index is not None:  # ItemIndex grows by doubling; a known size is allocated once
                units = -(-n // self.index.unit)
                if units > len(self.index.data):
                    data = np.zeros((units, self.index.data.shape[1]), dtype=np.uint8)
                    data[:len(self.index.data)] = self.index.data
                    self.index.data = data
        if len(self.slots) and n / len(self.slots) > _RESERVED_LOAD:
            self._rehash(int(n / _RESERVED_LOAD) + 1)

    def _grow_to(self, n: int, exact: bool = False) -> None:
        for name in ("versions", "starts") + (("rows",) if self.index is None else ()):
            array = getattr(self, name)
            if n > len(array):
                if exact:
                    grown = np.zeros((n,) + array.shape[1:], array.dtype)
                    grown[:len(array)] = array
                else:
                    grown = _grown(array, n)
                setattr(self, name, grown)

    def _rehash(self, capacity: int) -> None:
        self.slots = np.full(capacity, _EMPTY, dtype=self.slots.dtype)
        _rehash(self.slots, self.ids, self.starts, self.versions, self.n)
        self.slots_used = self.held

    def put_many(self, idx: np.ndarray, versions: np.ndarray, rows: np.ndarray, ids: list[bytes]) -> np.ndarray:
        """Apply rows in order (versions as held: version + 1); which were taken (the others are older
        than the row held at their index by then)."""
        if not len(idx):
            return np.zeros(0, dtype=bool)
        self._grow_to(int(idx.max()) + 1)
        if versions.max() > np.iinfo(self.versions.dtype).max:
            self.versions = self.versions.astype(np.uint64)
        data, locs = _prefixed(ids)
        if self.ids_used + len(data) > np.iinfo(self.starts.dtype).max:
            self.starts = self.starts.astype(np.uint64)
        self.ids = _grown(self.ids, self.ids_used + len(data))
        self.ids[self.ids_used:self.ids_used + len(data)] = np.frombuffer(data, dtype=np.uint8)
        locs += self.ids_used
        if len(self.slots):
            new = _new_ids(idx, locs, self.versions, self.starts, self.ids)
            if (self.slots_used + new) / len(self.slots) > _MAX_LOAD:
                self._rehash(int((self.held + new) / _GROWN_LOAD) + 1)
        taken, held, live, used = _put(idx, versions.astype(self.versions.dtype), locs, self.versions, self.starts,
                                       self.ids, self.slots)
        self.ids_used += len(data)
        self.held, self.ids_live, self.slots_used = self.held + held, self.ids_live + live, self.slots_used + used
        if taken.any():
            # the last row taken per index is the one held
            chosen = idx[taken]
            last = len(chosen) - 1 - np.unique(chosen[::-1], return_index=True)[1]
            at, kept = chosen[last], rows[taken][last]
            if self.index is not None:
                self.index.put(at, kept)
            else:
                self.rows[at] = kept
            self.n = max(self.n, int(at.max()) + 1)
            self._unpublished = None
        self._compact_ids()
        return taken

    def _compact_ids(self) -> None:
        """Replaced and dropped ids leave dead bytes; copy the live ones out once they are the minority."""
        if self.ids_used - self.ids_live > max(self.ids_live, 1 << 16):
            out = np.zeros(self.ids_live + self.ids_live // 16 + 16, dtype=np.uint8)
            self.ids_used = _compact(self.ids, self.starts, self.versions, self.n, out)
            self.ids = out

    def external_id(self, i: int) -> str:
        s, n = _id_at(self.ids, self.starts, i)
        return self.ids[s:s + n].tobytes().decode()

    def lookup(self, external_id: str) -> int | None:
        """The index a user id maps to (users only)."""
        q = np.frombuffer(external_id.encode(), dtype=np.uint8)
        found = _find(self.slots, self.ids, self.starts, q, 0, len(q))
        return None if found < 0 else int(self.slots[found])

    def drop(self, i: int, external_id: str) -> bool:
        """Forget the row at index i if it is the one of `external_id` (a tombstone of its key)."""
        if i >= self.n or self.versions[i] == 0 or self.external_id(i) != external_id:
            return False
        if len(self.slots):
            _unindex(self.slots, self.ids, self.starts, i)
        self.ids_live -= _id_size(self.ids, self.starts, i)
        self.versions[i] = 0
        self.held -= 1
        self._unpublished = None  # a dropped item is never scored: its bytes stay, excluded
        self._compact_ids()
        return True

    def indexed(self, index: ItemIndex) -> _Rows:
        """The same rows held by `index` (rows that arrived before the model's meta record)."""
        held = np.flatnonzero(self.versions[:self.n] > 0)
        index.put(held, self.rows[held])
        table = _Rows(self.width, index)
        for name in ("versions", "starts", "ids", "ids_used", "ids_live", "n", "held"):
            setattr(table, name, getattr(self, name))
        return table

    def unpublished(self) -> np.ndarray:
        """Indices below n without a row (a publication still arriving, or deleted)."""
        if self._unpublished is None:
            self._unpublished = np.flatnonzero(self.versions[:self.n] == 0)
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
        return rows.nbytes + self.versions.nbytes + self.starts.nbytes + self.ids.nbytes + self.slots.nbytes + cache


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
        self._batch: WriteBatch | None = None  # persistence of the records being applied
        # history versions of this batch so far (None: deleted); the store holds the rest
        self._histories: dict[bytes, int | None] = {}
        rejected = 0
        records = self._stored()
        while chunk := [record for _, record in zip(range(1 << 16), records)]:  # a restarted replica serves
            outcomes = self._apply_many(chunk, persist=False)                  # what it had before it reads
            rejected += sum(isinstance(outcome, RejectedUpdate) for outcome in outcomes)
        if rejected:
            log.warning("%s: %d stored records not loaded (they do not fit the stored model)", self.path, rejected)

    def _stored(self) -> Iterator[tuple[bytes, bytes]]:
        """The store's meta record, then its rows (histories stay in the store until a request reads one)."""
        meta = self.db.get(META_KEY)
        if meta is not None:
            yield META_KEY, meta
        for kind in (b"I", b"U"):
            for key, value in self.db.items(from_key=kind):
                if key[:1] != kind:
                    break
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
        """Apply records in order, persisted in one WriteBatch; per record what `apply` returns, or the
        RejectedUpdate it raises. The end state and every outcome are those of applying them one by one."""
        return self._apply_many(records, persist=True)

    def _apply_many(self, records: list[tuple[bytes, bytes | None]], persist: bool) -> list[bool | RejectedUpdate]:
        if not any(_row_block(key) for key, _ in records):
            return self._apply_flat(records, persist)
        # a block record is applied as the row records it stands for (stored as those): its outcome is
        # True if any of its rows was taken; it is rejected whole (every row of a block has one width)
        flat, owner, out = [], [], [False] * len(records)
        for position, (key, value) in enumerate(records):
            if not _row_block(key):
                flat.append((key, value))
                owner.append(position)
            elif value:  # a block's tombstone changes nothing: its rows are held under their own keys
                try:
                    rows = expand_block(key, value)
                except UpdateFormatError as exc:
                    out[position] = RejectedUpdate("malformed", str(exc))
                    continue
                last, longest = int.from_bytes(rows[-1][0][1:5], "big"), max(len(k) for k, _ in rows) - 5
                if last >= self.max_nodes:
                    out[position] = RejectedUpdate("index", f"node index {last} >= max_nodes={self.max_nodes}")
                elif longest > MAX_ID_BYTES:
                    out[position] = RejectedUpdate("malformed", f"external id of {longest} bytes (at most {MAX_ID_BYTES})")
                else:
                    flat += rows
                    owner += [position] * len(rows)
        for position, outcome in zip(owner, self._apply_flat(flat, persist)):
            if not isinstance(out[position], RejectedUpdate):
                out[position] = outcome if isinstance(outcome, RejectedUpdate) else out[position] or outcome
        return out

    def _apply_flat(self, records: list[tuple[bytes, bytes | None]], persist: bool) -> list[bool | RejectedUpdate]:
        self._batch = WriteBatch(raw_mode=True)
        self._histories.clear()
        out: list[bool | RejectedUpdate] = [False] * len(records)
        # a run of records that only set rows or histories is applied with array operations: rows of the
        # model's width, well-formed histories; the rest of a run (records that will be rejected, so
        # change nothing, and rows before any meta record) and meta records and tombstones one by one
        rows, histories, rest = [], [], []
        full = self._row_record_bytes()
        try:
            for position, (key, value) in enumerate(records):
                kind = key[:1]
                if not value or key == META_KEY:
                    self._apply_run(records, rows, histories, rest, out, persist)
                    rows, histories, rest = [], [], []
                    out[position] = self._apply_one(key, value, persist)
                    full = self._row_record_bytes()
                elif kind == b"H" or key[:2] == b"BH":
                    histories.append(position)
                elif len(value) == full and (kind == b"U" or kind == b"I") and 5 <= len(key) <= 5 + MAX_ID_BYTES:
                    rows.append(position)
                else:
                    rest.append(position)
            self._apply_run(records, rows, histories, rest, out, persist)
        finally:
            if persist:
                self.db.write(self._batch)
            self._batch = None
            self._histories.clear()
        return out

    def _row_record_bytes(self) -> int | None:
        """Length of a row record's value under the model held (None before any meta record)."""
        return None if self.meta is None else 8 + self.users.width

    def _apply_one(self, key: bytes, value: bytes | None, persist: bool) -> bool | RejectedUpdate:
        try:
            return self._apply(key, value, persist)
        except RejectedUpdate as exc:
            return exc

    def _apply_run(self, records: list, rows: list[int], histories: list[int], rest: list[int], out: list,
                   persist: bool) -> None:
        if rows:
            rest += self._apply_rows(records, rows, out, persist)
        if histories:
            self._apply_histories(records, histories, out, persist)
        # in order: rows before any meta record; then what the array passes left, which is rejected
        for position in rest:
            out[position] = self._apply_one(*records[position], persist)

    def _apply_rows(self, records: list, run: list[int], out: list, persist: bool) -> list[int]:
        """Row records of the model's width, in order; the positions left to apply one by one."""
        batch = decode_rows([records[p][0] for p in run], [records[p][1] for p in run], self.users.width)
        ok = batch.valid & (batch.index < self.max_nodes) & (batch.version < np.uint64(1 << 63))
        taken = np.zeros(len(run), dtype=bool)
        for table, mine in ((self.users, batch.user & ok), (self.items, ~batch.user & ok)):
            at = np.flatnonzero(mine)
            taken[at] = table.put_many(batch.index[at], batch.version[at] + np.uint64(1), batch.rows[at],
                                       [batch.external_ids[k] for k in at.tolist()])
        for k, fresh in zip(np.flatnonzero(ok).tolist(), taken[ok].tolist()):
            out[run[k]] = fresh
            if fresh and persist:
                self._batch.put(*records[run[k]])
        return [run[k] for k in np.flatnonzero(~ok).tolist()]  # each rejected with its reason there

    def _apply_histories(self, records: list, run: list[int], out: list, persist: bool) -> None:
        """History and history block records, in order, their held versions read from the store in one
        multi-get (both kinds are kept as received)."""
        fits = []
        for position in run:
            try:
                first, count, _ = history_span(*records[position])
            except UpdateFormatError as exc:
                out[position] = RejectedUpdate("malformed", str(exc))
                continue
            if first + count > self.max_nodes:
                out[position] = RejectedUpdate("index", f"user index {first + count - 1} >= max_nodes={self.max_nodes}")
            else:
                fits.append(position)
        unknown = [key for key in dict.fromkeys(records[p][0] for p in fits) if key not in self._histories]
        for key, value in zip(unknown, self.db[unknown] if unknown else []):
            self._histories[key] = None if value is None else int.from_bytes(value[:8], "little")
        for position in fits:
            key, value = records[position]
            version, held = int.from_bytes(value[:8], "little"), self._histories[key]
            out[position] = fresh = held is None or version >= held
            if fresh:
                self._histories[key] = version
                if persist:
                    self._batch.put(key, value)

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
            fresh = self._apply_record(key, _decode(key, value))
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
                self.users = self._user_table(width)
            fits = self.meta is None and self.items is not None and self.items.width == width
            self.items = self.items.indexed(index) if fits else _Rows(width, index)
        self.meta = meta
        self.users.reserve(meta["n_users"])
        self.items.reserve(meta["n_items"])
        return True

    def _user_table(self, width: int) -> _Rows:
        return _Rows(width, lookup=np.int32 if self.max_nodes < 1 << 31 else np.int64)

    def _reset(self) -> None:
        self.meta = self.scorer = self.users = self.items = None
        self._histories.clear()
        if self._batch is not None:  # what came before the reset is written first, then wiped
            self.db.write(self._batch)
            self._batch = WriteBatch(raw_mode=True)
        self.db.delete_range(b"\x00", b"\xff")

    def _apply_record(self, key: bytes, update: RowUpdate) -> bool:
        if update.index >= self.max_nodes:  # never allocated: a corrupt or hostile index
            raise RejectedUpdate("index", f"node index {update.index} >= max_nodes={self.max_nodes}")
        if update.version >= 1 << 63:  # versions are held as int64
            raise RejectedUpdate("malformed", f"version {update.version} out of range")
        external_id = key[5:]
        if len(external_id) > MAX_ID_BYTES:
            raise RejectedUpdate("malformed", f"external id of {len(external_id)} bytes (at most {MAX_ID_BYTES})")
        table = self._table_for(update)
        return bool(table.put_many(np.array([update.index]), np.array([update.version + 1], dtype=np.uint64),
                                   np.frombuffer(update.row, dtype=np.uint8)[None, :], [external_id])[0])

    def _history_version(self, key: bytes) -> int | None:
        """Version of the history held for a key (None: none), as of the records applied so far."""
        if key in self._histories:
            return self._histories[key]
        value = self.db.get(key)
        return None if value is None else int.from_bytes(value[:8], "little")

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
            table = self._user_table(width) if name == "users" else _Rows(width)  # rows may precede the meta
            setattr(self, name, table)
        return table

    def _delete(self, key: bytes, persist: bool) -> bool:
        if key == META_KEY:
            raise RejectedUpdate("malformed", "a tombstone of the meta record")
        if key[:1] == b"H" or key[:2] == b"BH":
            dropped = self._history_version(key) is not None
            self._histories[key] = None
        else:
            update = _decode(key, bytes(8))  # a tombstone has no value: decode its key with an empty one
            table = self.users if update.kind == "user" else self.items
            dropped = table is not None and table.drop(update.index, update.external_id)
        if persist:
            self._batch.delete(key)
        return dropped

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
        """Bytes of the arrays held: rows (as allocated), versions, ids and the user id index.
        Histories are in the store, not in memory; fixed overheads (a few KiB) are not counted."""
        return sum(t.memory_bytes for t in (self.users, self.items) if t is not None)

    def recommend(self, user: str, k: int) -> dict:
        """Top-k items for an external user id, the user's own items excluded."""
        if self.meta is None:  # with a meta record come both tables, items in the index
            raise NotReady("no model received yet")
        idx = self.users.lookup(user)
        if idx is None:
            raise UnknownUser(f"unknown user {user!r}")
        vector = self.scorer.user_vector(self.users.rows[idx])
        history = user_history(idx, *self.db[[history_key(idx), history_block_key(idx)]])
        # rows of a publication still arriving are served already; items not yet arrived are skipped
        best, best_scores = self.items.index.top_k(vector, k, np.concatenate([history, self.items.unpublished()]))
        return {"user": user, "k": k, "model_version": self.model_version,
                "user_version": int(self.users.versions[idx]) - 1,
                "items": [{"item": self.items.external_id(i), "score": float(s)}
                          for i, s in zip(best.tolist(), best_scores)]}

    def info(self) -> dict:
        return {"model_version": self.model_version, "users": 0 if self.users is None else self.users.held,
                "items": 0 if self.items is None else self.items.held, "model_bytes": self.model_bytes,
                "meta": self.meta}


def _row_block(key: bytes) -> bool:
    """A block record of rows (expanded into the row records it stands for), not of histories."""
    return key[:1] == b"B" and key[:2] != b"BH"


def _decode(key: bytes, value: bytes) -> RowUpdate:
    try:
        return decode_update(key, value)
    except UpdateFormatError as exc:
        raise RejectedUpdate("malformed", str(exc)) from None
