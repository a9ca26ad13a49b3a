"""Test doubles shared by unit and integration tests (tests/ is on sys.path: tests/conftest.py)."""

from __future__ import annotations

from kafka.errors import KafkaTimeoutError


class SentFuture:
    """What KafkaProducer.send returns, already completed."""

    def __init__(self, exception: Exception | None = None):
        self.is_done, self.exception = True, exception

    def failed(self) -> bool:
        return self.exception is not None


class RecordingProducer:
    """In-memory KafkaProducer: keeps what was sent, in order; while `failing`, every send fails."""

    def __init__(self):
        self.sent: list[tuple[str, bytes | None, bytes | None, dict]] = []  # topic, key, value, headers
        self.failing = False

    @property
    def records(self) -> list[tuple[bytes | None, bytes | None]]:
        return [(key, value) for _, key, value, _ in self.sent]

    def send(self, topic, key=None, value=None, headers=None) -> SentFuture:
        if self.failing:
            return SentFuture(KafkaTimeoutError("broker away"))
        self.sent.append((topic, key, value, dict(headers or [])))
        return SentFuture()

    def flush(self, timeout=None) -> None:
        pass
