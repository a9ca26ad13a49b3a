"""Interaction events on the wire: schema, strict validation and encoding.

One Kafka message per interaction, a JSON object:
    {"user": ID, "item": ID, "ts": unix_seconds, "event_id": ID (optional), "weight": number (optional)}
IDs are non-empty strings or integers of any size (an integer and its decimal string name the same
node), at most 256 characters either way.
Validation lives here only; every rejection carries a reason from `REJECTION_REASONS`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import NamedTuple

import orjson

REJECTION_REASONS = ("too_large", "invalid_json", "not_an_object", "missing_field", "wrong_type",
                     "bad_timestamp", "bad_weight")
# every reason a record reaches the dead-letter topic: a message's own faults, an event past the
# learner's --max-nodes, a compressed batch that cannot be decoded (corrupt or a compression bomb)
DEAD_LETTER_REASONS = REJECTION_REASONS + ("node_limit", "undecodable")
DEFAULT_MAX_BYTES = 4096
MAX_ID_CHARS = 256


class Event(NamedTuple):  # a tuple: built per message, several times cheaper than a frozen dataclass
    user: str
    item: str
    ts: float
    event_id: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


def _as_id(value: object) -> str | None:
    kind = type(value)  # exact types: a bool is not an id, and JSON parsers give no subclasses
    if kind is int:
        text = str(value)  # an integer id is its decimal string, under the same length limit
        return text if len(text) <= MAX_ID_CHARS else None
    if kind is str and 0 < len(value) <= MAX_ID_CHARS:
        return value
    return None


def _as_float(number: int | float) -> float:
    try:
        return float(number)
    except OverflowError:  # an integer beyond float range (Python's json reads any size)
        return math.inf


_NUMBERS = (int, float)  # exact types: a bool is not a number here, and JSON parsers give no subclasses


def _loads_exact(raw: bytes) -> object | Rejection:
    """Python's json: several times slower than orjson, but reads NaN, Infinity and integers of any size."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8, or an integer of > 4300 digits
        return Rejection("invalid_json", str(exc)[:200])


def parse_event(raw: bytes | None, max_bytes: int = DEFAULT_MAX_BYTES) -> Event | Rejection:
    """Validate one message value; never raises. Runs once per message, so it is written for speed."""
    if raw is None:
        return Rejection("missing_field", "empty message (null value)")
    if len(raw) > max_bytes:
        return Rejection("too_large", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        obj = orjson.loads(raw)  # several times faster than json for small objects
    except orjson.JSONDecodeError:  # what orjson refuses but json reads (NaN, Infinity, 1e400) is judged
        obj = _loads_exact(raw)
        return obj if type(obj) is Rejection else _validate(obj)
    result = _validate(obj)
    if type(result) is Rejection and result.reason == "wrong_type":
        # orjson reads an integer beyond 64 bits as a float, which no id may be: judge json's exact reading
        exact = _loads_exact(raw)
        if type(exact) is not Rejection:
            return _validate(exact)
    return result


def _validate(obj: object) -> Event | Rejection:
    if type(obj) is not dict:
        return Rejection("not_an_object", f"JSON {type(obj).__name__}, expected an object")
    try:
        user, item, ts = _as_id(obj["user"]), _as_id(obj["item"]), obj["ts"]
    except KeyError:
        missing = [k for k in ("user", "item", "ts") if k not in obj]
        return Rejection("missing_field", f"missing {', '.join(missing)}")
    if user is None or item is None:
        field = "user" if user is None else "item"
        return Rejection("wrong_type", f"{field} must be a non-empty string or an integer "
                                       f"(<= {MAX_ID_CHARS} chars)")
    if type(ts) not in _NUMBERS:
        return Rejection("wrong_type", "ts must be a number (unix seconds)")
    ts = _as_float(ts)
    if not 0 <= ts < math.inf:  # also false for NaN
        return Rejection("bad_timestamp", f"ts {ts!r} is not a finite, non-negative unix time")
    if len(obj) == 3:  # no optional fields: the common case
        return Event(user, item, ts)
    event_id = obj.get("event_id")
    if event_id is not None and _as_id(event_id) is None:
        return Rejection("wrong_type", f"event_id must be a non-empty string or an integer (<= {MAX_ID_CHARS} chars)")
    weight = obj.get("weight", 1.0)
    if type(weight) not in _NUMBERS:
        return Rejection("wrong_type", "weight must be a number")
    weight = _as_float(weight)
    if not 0 <= weight < math.inf:
        return Rejection("bad_weight", f"weight {weight!r} is not finite and non-negative")
    return Event(user, item, ts, _as_id(event_id) if event_id is not None else None, weight)


def encode_event(event: Event) -> bytes:
    obj: dict[str, object] = {"user": event.user, "item": event.item, "ts": event.ts}
    if event.event_id is not None:
        obj["event_id"] = event.event_id
    if event.weight != 1.0:
        obj["weight"] = event.weight
    return json.dumps(obj, separators=(",", ":")).encode()
