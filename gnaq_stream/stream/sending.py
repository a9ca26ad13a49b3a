"""Producing with checked results: `flush()` returns when sends complete *or fail*, so a send is done
only once its future says it succeeded."""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

Record = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]  # topic, key, value, headers


def send_all(producer: KafkaProducer, records: Iterable[Record]) -> int:
    """Send and flush `records`; raises the first failure (a KafkaError) unless every one was acknowledged.
    Returns how many were sent."""
    futures, size = [], 0
    for topic, key, value, headers in records:
        futures.append(producer.send(topic, key=key, value=value, headers=headers or None))
        size += len(value or b"")
    # bounded, so a stop request is honoured while the broker is away, with time for a big publication
    timeout = 5.0 + len(futures) / 20_000 + size / 5e6
    producer.flush(timeout=timeout)
    for future in futures:
        if not future.is_done:
            raise KafkaTimeoutError(f"send not acknowledged within {timeout:.0f}s")
        if future.failed():
            exc = future.exception
            raise exc if isinstance(exc, KafkaError) else KafkaError(repr(exc))
    return len(futures)
