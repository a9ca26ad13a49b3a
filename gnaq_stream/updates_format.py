"""The embedding-updates topic's wire format: the one contract between the learner that publishes and
the replicas that serve. Neither side owns it; both import it.

Records (key -> value; integers in keys big-endian so they sort, in values little-endian):
    b"M"                  JSON {"format", "model_id", "dim", "bits", "level_dtype", "version", "n_users",
                          "n_items"}: sent after each publication, so a replica knows which learner
                          version it has completely received; a learner's first publication also
                          starts with one (version -1), so a replica meeting a new model id starts
                          over before that model's rows arrive
    b"U" / b"I" + u32 idx + external id (UTF-8)
                          u64 version | serving row (packed, gnaq_stream.quant.packing)
    b"B" + b"U" / b"I" + u32 block
                          u64 version | u16 count | count x u16 id length | the ids | count x serving row:
                          the rows of nodes block x BLOCK_ROWS ... + count - 1 in one record, standing for
                          the row records of those nodes at that version (a propagation changes most rows:
                          one record per row made the producer, not the network, the bottleneck)
    b"H" + u32 user idx   u64 version | u32 item indices of everything the user interacted with
    b"B" + b"H" + u32 block
                          u64 version | u16 count | count x u32 history length | the histories' u32 item
                          indices back to back: the histories of users block x BLOCK_ROWS ... + count - 1
                          (every user of the block), standing for their history records at that version
                          (a micro-batch touching thousands of users sends ~BLOCK_ROWS x fewer records)
    any key -> no value   a tombstone: a new model deletes the keys of the one before it, so a compacted
                          topic holds only the current model

Every record is the whole current value for its key, so a compacted topic holds the full model and
replaying records is idempotent: a replica keeps, per node, the row with the highest version (a block
record holds every node of its block, so compaction never keeps an older block over a newer one), and
per user the newer of their history record and their block's history block record.
The topic must have exactly one partition: "model version v complete" means every record before the
meta record of v, which only one partition orders.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

UPDATES_FORMAT = "gnaq-updates/1"
META_KEY = b"M"
_U32 = struct.Struct(">I")
_VERSION = struct.Struct("<Q")
_BLOCK_HEAD = struct.Struct("<QH")  # version, count
BLOCK_HEAD_BYTES = _BLOCK_HEAD.size
BLOCK_ROWS = 256  # rows per block record: at most 256 x (row + id) bytes, far below Kafka's 1 MB default
_META_FIELDS = {"model_id": str, "dim": int, "bits": int, "level_dtype": str, "version": int, "n_users": int,
                "n_items": int}


@dataclass(frozen=True)
class RowUpdate:
    kind: str  # "user" or "item"
    index: int
    version: int
    row: bytes
    external_id: str


class UpdateFormatError(ValueError):
    """A record on the updates topic that this version cannot decode."""


def row_key(kind: str, index: int, external_id: str) -> bytes:
    return (b"U" if kind == "user" else b"I") + _U32.pack(index) + external_id.encode()


def row_record(kind: str, index: int, external_id: str, version: int, row: bytes) -> tuple[bytes, bytes]:
    return row_key(kind, index, external_id), _VERSION.pack(version) + row


def block_record(kind: str, block: int, version: int, ids: bytes, id_lengths: np.ndarray, rows: np.ndarray
                 ) -> tuple[bytes, bytes]:
    """Rows of nodes block x BLOCK_ROWS onwards: `rows` one packed row each, `ids` their external ids
    in UTF-8 back to back, `id_lengths` each one's length in bytes."""
    if not 0 < len(rows) <= BLOCK_ROWS or len(id_lengths) != len(rows) or int(np.sum(id_lengths)) != len(ids):
        raise ValueError(f"a block holds 1..{BLOCK_ROWS} rows, one id each")
    key = b"B" + (b"U" if kind == "user" else b"I") + _U32.pack(block)
    return key, _BLOCK_HEAD.pack(version, len(rows)) + np.asarray(id_lengths, dtype="<u2").tobytes() + ids \
        + np.ascontiguousarray(rows, dtype=np.uint8).tobytes()


def expand_block(key: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    """The row records (key, value) a block record stands for, in index order."""
    if len(key) != 6 or key[1:2] not in (b"U", b"I") or len(value) < _BLOCK_HEAD.size:
        raise UpdateFormatError(f"not a block record: key {key[:16]!r}")
    version, count = _BLOCK_HEAD.unpack_from(value)
    at = _BLOCK_HEAD.size + 2 * count
    if not 0 < count <= BLOCK_ROWS or len(value) < at:
        raise UpdateFormatError(f"block record of {count} rows (1..{BLOCK_ROWS})")
    ends = at + np.cumsum(np.frombuffer(value, dtype="<u2", count=count, offset=_BLOCK_HEAD.size), dtype=np.int64)
    rows = len(value) - int(ends[-1])
    if rows <= 0 or rows % count:
        raise UpdateFormatError("block record whose rows are not whole")
    width, first = rows // count, _U32.unpack(key[2:6])[0] * BLOCK_ROWS
    if first + count > 1 << 32:
        raise UpdateFormatError("block record past the last u32 node index")
    ids = [value[s:e] for s, e in zip([at, *ends[:-1].tolist()], ends.tolist())]
    try:  # one decode for all; an ASCII separator cannot hide a bad sequence across two ids
        b"\n".join(ids).decode()
    except UnicodeDecodeError:
        raise UpdateFormatError(f"block record with an external id that is not UTF-8: {key!r}") from None
    head, stamp, base = key[1:2], _VERSION.pack(version), int(ends[-1])
    return [(head + _U32.pack(first + r) + i, stamp + value[base + r * width:base + (r + 1) * width])
            for r, i in enumerate(ids)]


def history_key(user: int) -> bytes:
    return b"H" + _U32.pack(user)


def history_record(user: int, version: int, items: np.ndarray) -> tuple[bytes, bytes]:
    return history_key(user), _VERSION.pack(version) + np.asarray(items, dtype="<u4").tobytes()


def history_block_record(block: int, version: int, lengths: np.ndarray, items: np.ndarray) -> tuple[bytes, bytes]:
    """Histories of users block x BLOCK_ROWS onwards: `lengths` items each, `items` back to back."""
    if not 0 < len(lengths) <= BLOCK_ROWS or int(np.sum(lengths)) != len(items):
        raise ValueError(f"a history block holds 1..{BLOCK_ROWS} histories, `lengths` items each")
    return history_block_key(block * BLOCK_ROWS), _BLOCK_HEAD.pack(version, len(lengths)) \
        + np.asarray(lengths, dtype="<u4").tobytes() + np.asarray(items, dtype="<u4").tobytes()


def history_span(key: bytes, value: bytes) -> tuple[int, int, int]:
    """(first user, users, version) of a history record (one user) or a history block record;
    UpdateFormatError if it is neither or malformed."""
    if key[:1] == b"H":
        if len(key) != 5 or len(value) < _VERSION.size or (len(value) - _VERSION.size) % 4:
            raise UpdateFormatError("history record with a malformed key or a partial item index")
        return _U32.unpack(key[1:5])[0], 1, _VERSION.unpack_from(value)[0]
    if key[:2] != b"BH" or len(key) != 6 or len(value) < _BLOCK_HEAD.size:
        raise UpdateFormatError(f"not a history record: key {key[:16]!r}")
    version, count = _BLOCK_HEAD.unpack_from(value)
    at = _BLOCK_HEAD.size + 4 * count
    if not 0 < count <= BLOCK_ROWS or len(value) < at:
        raise UpdateFormatError(f"history block record of {count} histories (1..{BLOCK_ROWS})")
    items = int(np.frombuffer(value, dtype="<u4", count=count, offset=_BLOCK_HEAD.size).sum(dtype=np.int64))
    if len(value) != at + 4 * items:
        raise UpdateFormatError("history block record whose lengths do not match its items")
    first = _U32.unpack(key[2:6])[0] * BLOCK_ROWS
    if first + count > 1 << 32:
        raise UpdateFormatError("history block record past the last u32 user index")
    return first, count, version


def history_block_key(user: int) -> bytes:
    """Key of the history block record that holds `user`."""
    return b"BH" + _U32.pack(user // BLOCK_ROWS)


def user_history(user: int, record: bytes | None, block: bytes | None) -> np.ndarray:
    """A user's items (int64) from the newer of their history record's value and their block's
    history block record's value (either None: not held; both checked by `history_span`)."""
    version = -1 if record is None else _VERSION.unpack_from(record)[0]
    block_version, count = (-1, 0) if block is None else _BLOCK_HEAD.unpack_from(block)
    if block_version > version:
        lengths = np.frombuffer(block, dtype="<u4", count=count, offset=_BLOCK_HEAD.size).astype(np.int64)
        row = user % BLOCK_ROWS
        if row >= count:
            return np.zeros(0, dtype=np.int64)
        start = _BLOCK_HEAD.size + 4 * (count + int(lengths[:row].sum()))
        return np.frombuffer(block, dtype="<u4", count=int(lengths[row]), offset=start).astype(np.int64)
    if record is None:
        return np.zeros(0, dtype=np.int64)
    return np.frombuffer(record, dtype="<u4", offset=_VERSION.size).astype(np.int64)


def meta_record(meta: dict) -> tuple[bytes, bytes]:
    return META_KEY, json.dumps({"format": UPDATES_FORMAT, **meta}).encode()


def decode_meta(value: bytes) -> dict:
    try:
        meta = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        raise UpdateFormatError("meta record is not JSON") from None
    if not isinstance(meta, dict):
        raise UpdateFormatError(f"meta record is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != UPDATES_FORMAT:
        raise UpdateFormatError(f"unknown updates format {meta.get('format')!r}")
    for name, kind in _META_FIELDS.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise UpdateFormatError(f"meta record field {name!r} missing or not {kind.__name__}")
    return meta


def decode_update(key: bytes, value: bytes) -> RowUpdate:
    """A row record (meta records are read with `decode_meta`, histories with `history_span`)."""
    kind = key[:1]
    if kind not in (b"U", b"I") or len(key) < 5 or len(value) < _VERSION.size:
        raise UpdateFormatError(f"not an update record: key {key[:16]!r}")
    index = _U32.unpack(key[1:5])[0]
    version = _VERSION.unpack_from(value)[0]
    body = value[_VERSION.size:]
    try:
        external_id = key[5:].decode()
    except UnicodeDecodeError:
        raise UpdateFormatError(f"row record whose external id is not UTF-8: {key[:16]!r}") from None
    return RowUpdate("user" if kind == b"U" else "item", index, version, body, external_id)


@dataclass(frozen=True)
class RowBatch:
    """Row records decoded together (`decode_rows`), one entry per record, in order."""

    user: np.ndarray  # bool: a user row, else an item row
    index: np.ndarray  # int64
    version: np.ndarray  # uint64
    rows: np.ndarray  # uint8, one packed row per record
    external_ids: list[bytes]  # as in the key (UTF-8 where `valid`)
    valid: np.ndarray  # bool: the external id is UTF-8


def decode_rows(keys: list[bytes], values: list[bytes], width: int) -> RowBatch:
    """Row records whose values all hold a version and a `width`-byte row, decoded with array
    operations (a replica catching up reads them by the hundred thousand). The caller has checked
    that each key is b"U" or b"I" + u32 index + id and each value is 8 + `width` bytes long."""
    n = len(keys)
    heads = np.frombuffer(b"".join(k[:5] for k in keys), dtype=np.uint8).reshape(n, 5)
    body = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(n, _VERSION.size + width)
    ids = [k[5:] for k in keys]
    try:  # one decode for all; an ASCII separator cannot hide a bad sequence across two ids
        b"\n".join(ids).decode()
        valid = np.ones(n, dtype=bool)
    except UnicodeDecodeError:
        valid = np.fromiter((_is_utf8(i) for i in ids), dtype=bool, count=n)
    return RowBatch(user=heads[:, 0] == ord("U"), index=heads[:, 1:].copy().view(">u4").ravel().astype(np.int64),
                    version=body[:, :_VERSION.size].copy().view("<u8").ravel(), rows=body[:, _VERSION.size:],
                    external_ids=ids, valid=valid)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
