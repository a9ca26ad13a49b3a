"""The learner's on-disk state in RocksDB (rocksdict, raw bytes), written once per micro-batch.

Resume contract: each micro-batch is one atomic WriteBatch holding the changed node rows, the id-map
additions, the batch's events (one log record) and the next Kafka offset of every partition it
consumed. After a crash the store is exactly the state after some micro-batch, and reading resumes
from the offsets stored with it, so no event is lost or applied twice.

The graph is a snapshot (its edges with event counts as of one version) plus the log of the batches
since; `write_snapshot` replaces the snapshot and drops the log it covers, so a restart reads the
snapshot and a short log instead of every event ever streamed.

Keys (integers big-endian so keys sort by index):
    b"Mmodel"                      JSON: format, model_id, dim, bits, level_dtype, n_layers (written once)
    b"Mstate"                      JSON: version, n_users, n_items, n_edges, n_events
    b"U" + u32 idx / b"I" + u32    node row: u64 LE version + packed row (gnaq_stream.quant.packing)
    b"u" + u32 idx / b"i" + u32    external id (UTF-8) of a user / item
    b"Nu" / b"Ni" + external id    u32 BE internal index (lookup by external id)
    b"E" + u64 version             the (user, item) index pairs of that micro-batch's events, u32 LE each:
                                   one record per batch, not one key per edge (the write cost is per key)
    b"Mgraph"                      JSON: the graph snapshot's version, events, edges, chunks
    b"G" + u64 version + u32 chunk a chunk of that snapshot's edges: (user, item, event count) u32 LE each
    b"O" + topic + b"\\0" + u32     i64 LE next offset to read in that partition
    b"T" + topic                   the topic's id (Kafka topic ID) the offsets refer to: a topic deleted and
                                   re-created under the same name has another
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rocksdict import AccessType, Options, Rdict, ReadOptions, WriteBatch

from gnaq_stream.config import LearnerConfig
from gnaq_stream.errors import GnaqError
from gnaq_stream.graph.interaction_graph import InteractionGraph
from gnaq_stream.quant.node_table import NodeTable
from gnaq_stream.quant.packing import code_bytes, level_bytes, row_bytes

STORE_FORMAT = "gnaq-stream-store/2"
_U32 = struct.Struct(">I")
_VERSION = struct.Struct("<Q")
_OFFSET = struct.Struct("<q")
_SEQ = struct.Struct(">Q")
SNAPSHOT_CHUNK_EDGES = 1 << 20  # 12 MiB per value


class StoreError(GnaqError):
    """The store cannot be opened or does not match the model."""


@dataclass
class NodeRows:
    """Changed rows of one node kind: indices, the model version that last changed each, packed rows."""

    index: np.ndarray
    version: np.ndarray
    packed: np.ndarray  # (len(index), row bytes) uint8


@dataclass
class ChangeSet:
    """Everything one micro-batch (or consolidation slice) changed: written as one atomic WriteBatch."""

    state: dict  # version, n_users, n_items, n_edges, n_events after the change
    model: dict | None = None  # the model's shape and id: written only into an empty store
    new_users: list[str] = field(default_factory=list)
    first_user: int = 0  # internal index of new_users[0]
    new_items: list[str] = field(default_factory=list)
    first_item: int = 0
    users: NodeRows | None = None
    items: NodeRows | None = None
    events: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.uint32))  # (user, item) pairs
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to read per partition
    topic_ids: dict[str, str] = field(default_factory=dict)  # what the offsets refer to


@dataclass
class StoredState:
    """What a store holds, ready to build a learner from."""

    cfg: LearnerConfig
    graph: InteractionGraph
    users: NodeTable
    items: NodeTable
    version: int
    model_id: str | None


def offset_key(topic: str, partition: int) -> bytes:
    return b"O" + topic.encode() + b"\0" + _U32.pack(partition)


def _scan(db: Rdict, prefix: bytes):
    it = db.iter()
    it.seek(prefix)
    while it.valid() and it.key().startswith(prefix):
        yield it.key(), it.value()
        it.next()


def _scan_all(db: Rdict, prefix: bytes) -> tuple[list[bytes], list[bytes]]:
    """Every key and value under a one-byte prefix, read by RocksDB's own iteration: a restart reads
    millions of ids and rows, and a Python step per key cost most of its time."""
    bound = ReadOptions()
    bound.set_iterate_upper_bound(bytes([prefix[0] + 1]))
    return list(db.keys(from_key=prefix, read_opt=bound)), list(db.values(from_key=prefix, read_opt=bound))


def _indices(path: Path, keys: list[bytes], what: str) -> None:
    """Keys `prefix + u32 index` must be exactly 0..n-1 (they sort by index)."""
    joined = b"".join(keys)
    found = np.frombuffer(joined, dtype=np.uint8).reshape(-1, 5)[:, 1:].copy().view(">u4").ravel() \
        if len(joined) == 5 * len(keys) else None
    if found is None or not np.array_equal(found, np.arange(len(keys))):
        raise StoreError(f"{path}: {what} are not indexed 0..{len(keys) - 1} without gaps")


class EmbeddingStore:
    """Single-writer store; other processes open it with `read_only=True` (a snapshot)."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        if read_only and not (self.path / "CURRENT").exists():
            raise StoreError(f"{self.path}: no store here")
        try:
            access = AccessType.read_only() if read_only else AccessType.read_write()
            self.db = Rdict(str(self.path), options=Options(raw_mode=True), access_type=access)
        except Exception as exc:  # rocksdict raises plain Exception subclasses without a public base
            raise StoreError(f"{self.path}: cannot open store ({exc})") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _json(self, key: bytes) -> dict | None:
        raw = self.db.get(key)
        return None if raw is None else json.loads(raw)

    def model_meta(self) -> dict | None:
        return self._json(b"Mmodel")

    def state_meta(self) -> dict:
        return self._json(b"Mstate") or {"version": 0, "n_users": 0, "n_items": 0, "n_edges": 0, "n_events": 0}

    def offsets(self) -> dict[tuple[str, int], int]:
        out = {}
        for key, value in _scan(self.db, b"O"):
            topic, part = key[1:-5].decode(), _U32.unpack(key[-4:])[0]
            out[(topic, part)] = _OFFSET.unpack(value)[0]
        return out

    def topic_id(self, topic: str) -> str | None:
        raw = self.db.get(b"T" + topic.encode())
        return None if raw is None else raw.decode()

    def snapshot_meta(self) -> dict:
        """The graph snapshot's version and the events it holds (version -1: none yet)."""
        return self._json(b"Mgraph") or {"version": -1, "events": 0, "edges": 0, "chunks": 0}

    def is_empty(self) -> bool:
        return self.model_meta() is None

    # ---- writing --------------------------------------------------------------------------------

    def write(self, change: ChangeSet) -> None:
        """One atomic WriteBatch: changed rows, new ids, the batch's events, offsets, counters. A full
        disk or any other write failure raises StoreError and leaves the store as it was."""
        wb = WriteBatch(raw_mode=True)
        if change.model is not None and self.is_empty():
            wb.put(b"Mmodel", json.dumps({"format": STORE_FORMAT, **change.model}).encode())
        for kind, first, names in ((b"u", change.first_user, change.new_users),
                                   (b"i", change.first_item, change.new_items)):
            for k, ext in enumerate(names):
                idx = _U32.pack(first + k)
                wb.put(kind + idx, ext.encode())
                wb.put(b"N" + kind + ext.encode(), idx)
        for prefix, rows in ((b"U", change.users), (b"I", change.items)):
            if rows is not None and len(rows.index):
                # keys and values built as arrays: a batch can change tens of thousands of rows
                keys = np.empty((len(rows.index), 5), dtype=np.uint8)
                keys[:, 0] = prefix[0]
                keys[:, 1:] = rows.index.astype(">u4").view(np.uint8).reshape(-1, 4)
                values = np.concatenate([rows.version.astype("<u8").view(np.uint8).reshape(-1, 8), rows.packed],
                                        axis=1)
                for key, value in zip(keys, values):
                    wb.put(key.tobytes(), value.tobytes())
        if len(change.events):
            wb.put(b"E" + _SEQ.pack(change.state["version"]), np.ascontiguousarray(change.events, dtype="<u4").tobytes())
        for (topic, part), offset in change.offsets.items():
            wb.put(offset_key(topic, part), _OFFSET.pack(offset))
        for topic, topic_id in change.topic_ids.items():
            wb.put(b"T" + topic.encode(), topic_id.encode())
        wb.put(b"Mstate", json.dumps(change.state).encode())
        try:
            self.db.write(wb)
        except Exception as exc:  # rocksdict raises plain Exceptions (e.g. "No space left on device")
            raise StoreError(f"{self.path}: write failed ({exc}); nothing of this batch was stored") from None

    def write_snapshot(self, version: int, n_events: int, users: np.ndarray, items: np.ndarray,
                       counts: np.ndarray) -> None:
        """Make the graph as of `version` (every event logged up to it: these edges, with their event
        counts) the snapshot, and drop the log it covers. Its chunks are written first under the new
        version; one final WriteBatch then points Mgraph at them and deletes the old snapshot and the
        covered log, so a crash at any point leaves either the old snapshot and the whole log or the
        new one and the rest."""
        old = self.snapshot_meta()
        if old["version"] == version:
            return
        try:
            # chunks of a snapshot a crash interrupted are nobody's: clear them first
            self.db.delete_range(b"G", b"G" + _SEQ.pack(max(old["version"], 0)))
            self.db.delete_range(b"G" + _SEQ.pack(old["version"] + 1), b"H")
            chunks = 0
            for start in range(0, len(users), SNAPSHOT_CHUNK_EDGES):
                end = start + SNAPSHOT_CHUNK_EDGES
                body = np.stack([users[start:end], items[start:end], counts[start:end]], axis=1).astype("<u4")
                self.db.put(b"G" + _SEQ.pack(version) + _U32.pack(chunks), body.tobytes())
                chunks += 1
            wb = WriteBatch(raw_mode=True)
            wb.put(b"Mgraph", json.dumps({"version": version, "events": n_events, "edges": len(users),
                                          "chunks": chunks}).encode())
            if old["version"] >= 0:
                wb.delete_range(b"G" + _SEQ.pack(old["version"]), b"G" + _SEQ.pack(old["version"] + 1))
            wb.delete_range(b"E", b"E" + _SEQ.pack(version + 1))
            self.db.write(wb)
        except Exception as exc:  # rocksdict raises plain Exceptions
            raise StoreError(f"{self.path}: snapshot failed ({exc}); the previous one and the log still hold "
                             "the graph") from None

    # ---- reading --------------------------------------------------------------------------------

    def load(self, cfg: LearnerConfig) -> StoredState:
        """The learner's state as stored (cfg's model shape replaced by the store's)."""
        meta = self.model_meta()
        if meta is None:
            raise StoreError(f"{self.path}: empty store")
        if meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.path}: store format {meta.get('format')!r}, this version reads {STORE_FORMAT!r}; "
                             "start a new store (from the checkpoint) under a new --group, so the topic is read "
                             "into it from the start")
        cfg = LearnerConfig(**{**cfg.__dict__, **{k: meta[k] for k in ("dim", "bits", "level_dtype", "n_layers")}})
        state = self.state_meta()
        graph = InteractionGraph()
        for kind, add in ((b"u", graph.add_users), (b"i", graph.add_items)):
            keys, values = _scan_all(self.db, kind)
            _indices(self.path, keys, f"ids {kind.decode()}")
            add([value.decode() for value in values])
        snapshot = self.snapshot_meta()
        if snapshot["version"] >= 0:
            parts = [np.frombuffer(value, dtype="<u4").reshape(-1, 3)
                     for _, value in _scan(self.db, b"G" + _SEQ.pack(snapshot["version"]))]
            edges = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.uint32)
            if len(parts) != snapshot["chunks"] or len(edges) != snapshot["edges"]:
                raise StoreError(f"{self.path}: graph snapshot {snapshot['version']} has {len(parts)} chunks and "
                                 f"{len(edges)} edges, its record says {snapshot['chunks']} and {snapshot['edges']}")
            graph.add_interactions(edges[:, 0], edges[:, 1], edges[:, 2])
        log = [np.frombuffer(value, dtype="<u4") for _, value in _scan(self.db, b"E")]
        pairs = np.concatenate(log).reshape(-1, 2).astype(np.int64) if log else np.zeros((0, 2), dtype=np.int64)
        graph.add_interactions(pairs[:, 0], pairs[:, 1])
        tables = []
        for prefix, n in ((b"U", graph.n_users), (b"I", graph.n_items)):
            table = NodeTable(cfg.dim, cfg.bits, cfg.level_dtype, capacity=max(n, 1024))
            width = _VERSION.size + row_bytes(cfg.dim, cfg.bits, cfg.level_dtype)
            keys, values = _scan_all(self.db, prefix)
            if len(keys) != n:
                raise StoreError(f"{self.path}: {len(keys)} rows for {n} {prefix.decode()} nodes")
            _indices(self.path, keys, f"rows {prefix.decode()}")
            body = b"".join(values)
            if len(body) != n * width:
                raise StoreError(f"{self.path}: {prefix.decode()} rows of another size than {width} bytes")
            body = np.frombuffer(body, dtype=np.uint8).reshape(n, width)
            table.load_rows(body[:, _VERSION.size:], body[:, :_VERSION.size].copy().view("<u8").ravel().astype(np.int64))
            tables.append(table)
        return StoredState(cfg, graph, tables[0], tables[1], state["version"], meta.get("model_id"))


def inspect_store(path: str | Path) -> dict:
    """Counts, bytes and offsets of a store, read from a read-only snapshot (safe while a learner runs)."""
    with EmbeddingStore(path, read_only=True) as store:
        meta = store.model_meta()
        if meta is None:
            raise StoreError(f"{path}: empty store")
        state = store.state_meta()
        n_nodes = state["n_users"] + state["n_items"]
        dim, bits, dtype = meta["dim"], meta["bits"], meta["level_dtype"]
        codes, levels = n_nodes * code_bytes(dim, bits), n_nodes * level_bytes(bits, dtype)
        fp32 = n_nodes * dim * 4
        return {
            "users": state["n_users"], "items": state["n_items"], "nodes": n_nodes, "edges": state["n_edges"],
            "events": state["n_events"], "model_version": state["version"], "dim": dim, "bits": bits,
            "level_dtype": dtype, "bytes_codes": codes, "bytes_levels": levels, "bytes_model": codes + levels,
            "bytes_fp32": fp32, "compression": fp32 / (codes + levels) if n_nodes else None,
            "offsets": {f"{t}:{p}": o for (t, p), o in sorted(store.offsets().items())},
        }
