"""Integer ids of any size: orjson reads integers beyond 64 bits as floats, the README accepts them."""

import json

import pytest

from gnaq_stream.data.events import MAX_ID_CHARS, Event, Rejection, parse_event

BIG = [2**64 - 1, 2**64, -(2**63) - 1, 2**200, -(10**254), 10**(MAX_ID_CHARS - 1)]


def message(user: object, item: object = 7, **extra: object) -> bytes:
    return json.dumps({"user": user, "item": item, "ts": 5, **extra}).encode()


@pytest.mark.parametrize("big", BIG)
def test_an_integer_id_of_any_size_is_its_decimal_string(big):
    assert parse_event(message(big, big), max_bytes=1024) == Event(str(big), str(big), 5.0)
    assert parse_event(message(str(big), str(big)), max_bytes=1024) == Event(str(big), str(big), 5.0)
    with_optional = parse_event(message(1, big, event_id=big, weight=2), max_bytes=1024)
    assert with_optional == Event("1", str(big), 5.0, str(big), 2.0)


def test_42_and_the_string_42_are_the_same_id():
    assert parse_event(message(42, "42")) == parse_event(message("42", 42)) == Event("42", "42", 5.0)


@pytest.mark.parametrize("raw", [
    message(10**MAX_ID_CHARS),  # 257 digits
    message(-(10**(MAX_ID_CHARS - 1))),  # 256 digits and a sign
    message("x" * (MAX_ID_CHARS + 1)),
    message(1, 2, event_id=10**MAX_ID_CHARS),
    message(1.5),  # a float is no id, whichever parser read it
    message(1e20),
    b'{"user": 1' + b"0" * 400 + b', "item": 1, "ts": 5}',  # beyond float range: orjson refuses, json reads it
])
def test_ids_longer_than_the_limit_and_floats_are_wrong_type(raw):
    result = parse_event(raw, max_bytes=1024)
    assert isinstance(result, Rejection) and result.reason == "wrong_type", result


def test_an_integer_too_long_for_python_is_rejected_not_raised():
    # json refuses integers of more than 4300 digits (ValueError), far beyond any id
    result = parse_event(message(1, 2).replace(b'"user": 1', b'"user": 1' + b"0" * 5000), max_bytes=10_000)
    assert isinstance(result, Rejection) and result.reason == "invalid_json"


def test_a_nesting_json_cannot_read_keeps_its_rejection():
    # orjson reads 1000 levels, Python's json hits its recursion limit re-reading it: still wrong_type
    raw = b'{"user": ' + b"[" * 1000 + b"]" * 1000 + b', "item": 1, "ts": 5}'
    result = parse_event(raw)
    assert isinstance(result, Rejection) and result.reason == "wrong_type"


def test_other_wrong_types_are_unchanged_by_the_second_reading():
    result = parse_event(message(1, 2, weight="heavy"))
    assert isinstance(result, Rejection) and (result.reason, result.detail) == ("wrong_type", "weight must be a number")
