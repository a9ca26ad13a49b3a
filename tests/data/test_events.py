import pytest

from gnaq_stream.data.events import Event, Rejection, encode_event, parse_event


@pytest.mark.parametrize("raw,expected", [
    (b'{"user": 1, "item": "a", "ts": 5}', Event("1", "a", 5.0)),
    (b'{"user": "u", "item": 2, "ts": 1.5, "event_id": 9, "weight": 2}', Event("u", "2", 1.5, "9", 2.0)),
])
def test_valid_events(raw, expected):
    assert parse_event(raw) == expected


@pytest.mark.parametrize("raw,reason", [
    (b"not json", "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"user": 1, "ts": 3}', "missing_field"),
    (None, "missing_field"),
    (b'{"user": true, "item": 1, "ts": 3}', "wrong_type"),
    (b'{"user": "", "item": 1, "ts": 3}', "wrong_type"),
    (b'{"user": 1, "item": [1], "ts": 3}', "wrong_type"),
    (b'{"user": 1, "item": 1, "ts": "3"}', "wrong_type"),
    (b'{"user": 1, "item": 1, "ts": -1}', "bad_timestamp"),
    (b'{"user": 1, "item": 1, "ts": NaN}', "bad_timestamp"),
    (b'{"user": 1, "item": 1, "ts": Infinity}', "bad_timestamp"),
    (b'{"user": 1, "item": 1, "ts": 1' + b"0" * 400 + b'}', "bad_timestamp"),
    (b'{"user": 1, "item": 1, "ts": 3, "weight": 1' + b"0" * 400 + b'}', "bad_weight"),
    (b'{"user": 1, "item": 1, "ts": 3, "weight": -2}', "bad_weight"),
    (b'{"user": 1, "item": 1, "ts": 3, "weight": "x"}', "wrong_type"),
    (b'{"user": 1, "item": 1, "ts": 3, "event_id": {}}', "wrong_type"),
])
def test_rejections_carry_a_reason(raw, reason):
    result = parse_event(raw)
    assert isinstance(result, Rejection) and result.reason == reason and result.detail


def test_size_limit():
    raw = b'{"user": 1, "item": 1, "ts": 3, "pad": "' + b"x" * 100 + b'"}'
    assert parse_event(raw, max_bytes=64).reason == "too_large"
    assert isinstance(parse_event(raw, max_bytes=4096), Event)


def test_encode_round_trip():
    ev = Event("u1", "i9", 12.0, "e1", 0.5)
    assert parse_event(encode_event(ev)) == ev
