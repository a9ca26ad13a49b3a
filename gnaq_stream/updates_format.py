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
    b"H" + u32 user idx   u64 version | u32 item indices of everything the user interacted with
    any key -> no value   a tombstone: a new model deletes the keys of the one before it, so a compacted
                          topic holds only the current model

Every record is the whole current value for its key, so a compacted topic holds the full model and
replaying records is idempotent: a replica keeps, per key, the record with the highest version.
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
_META_FIELDS = {"model_id": str, "dim": int, "bits": int, "level_dtype": str, "version": int, "n_users": int,
                "n_items": int}


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


def row_record(kind: str, index: int, external_id: str, version: int, row: bytes) -> tuple[bytes, bytes]:
    return row_key(kind, index, external_id), _VERSION.pack(version) + row


def history_record(user: int, version: int, items: np.ndarray) -> tuple[bytes, bytes]:
    return b"H" + _U32.pack(user), _VERSION.pack(version) + np.asarray(items, dtype="<u4").tobytes()


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
