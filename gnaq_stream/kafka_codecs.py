"""Bounded decompression of Kafka record batches for kafka-python.

kafka-python inflates a whole compressed record batch in memory before anything sees a message, so
the learner's per-message size limit comes too late: a 1 MB gzip batch of zeros inflates to ~1 GB.
`install_bounded_decoders()` replaces kafka-python's gzip, snappy, lz4 and zstd decoders with
streaming ones that stop after a fixed number of output bytes.
"""

from __future__ import annotations

import functools
import gzip
import io
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import cramjam
import kafka.codec
import kafka.record.default_records
import kafka.record.legacy_records
import lz4.frame
import zstandard
from kafka.consumer.fetcher import Fetcher
from kafka.record.default_records import DefaultRecordBatch
from kafka.structs import TopicPartition

# a 1 MiB batch (the learner caps partition fetches there) of JSON events inflates 3-5x: generous
DEFAULT_MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024
_CHUNK = 256 * 1024
_XERIAL_MAGIC = b"\x82SNAPPY\x00"  # kafka-python's and the Java client's framed snappy
# what the codec libraries raise on corrupt input (gzip: BadGzipFile is an OSError, truncation EOFError)
_CODEC_ERRORS = (OSError, EOFError, RuntimeError, zlib.error, zstandard.ZstdError, cramjam.DecompressionError,
                 struct.error)


class DecompressionError(ValueError):
    """A compressed record batch cannot be decoded: corrupt, or it inflates beyond the limit.

    Raised out of KafkaConsumer.poll() once `install_bounded_decoders()` ran, with `topic_partition`
    and, for the v2 record format (producers since Kafka 0.11), the batch's `base_offset` and
    `next_offset` (its last offset + 1: seek there to skip the batch); None where unknown.
    """

    topic_partition: TopicPartition | None = None
    base_offset: int | None = None
    next_offset: int | None = None


class DecompressionLimitError(DecompressionError):
    """A compressed record batch inflates beyond the limit (a compression bomb, or a huge batch)."""


def _join_bounded(chunks: Iterable[bytes], max_bytes: int) -> bytes:
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise DecompressionLimitError(f"compressed record batch inflates beyond {max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _read_chunks(reader: BinaryIO) -> Iterator[bytes]:
    with reader:
        while chunk := reader.read(_CHUNK):
            yield chunk


def _gzip_chunks(payload: bytes, max_bytes: int) -> Iterator[bytes]:
    return _read_chunks(gzip.GzipFile(fileobj=io.BytesIO(payload)))  # reads every gzip member, like kafka-python


def _lz4_chunks(payload: bytes, max_bytes: int) -> Iterator[bytes]:
    return _read_chunks(lz4.frame.LZ4FrameFile(io.BytesIO(payload)))


def _zstd_chunks(payload: bytes, max_bytes: int) -> Iterator[bytes]:
    return _read_chunks(zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=True))


def _snappy_chunks(payload: bytes, max_bytes: int) -> Iterator[bytes]:
    for block in _xerial_blocks(payload) if payload[:8] == _XERIAL_MAGIC else (payload,):
        # a raw snappy block states its length up front and is decoded whole: check before inflating
        if cramjam.snappy.decompress_raw_len(block) > max_bytes:
            raise DecompressionLimitError(f"snappy block inflates beyond {max_bytes} bytes")
        yield bytes(cramjam.snappy.decompress_raw(block))


def _xerial_blocks(payload: bytes) -> Iterator[bytes]:
    # 16-byte header, then blocks of (big-endian int32 length, raw snappy bytes)
    pos = 16
    while pos < len(payload):
        (length,) = struct.unpack_from(">i", payload, pos)
        pos += 4
        if length < 0 or pos + length > len(payload):
            raise DecompressionError("truncated snappy (xerial) block")
        yield payload[pos:pos + length]
        pos += length


# (payload, max_bytes) -> decompressed chunks; only snappy needs the limit, to refuse a block before inflating it
_CHUNKERS: dict[str, Callable[[bytes, int], Iterator[bytes]]] = {
    "gzip": _gzip_chunks, "snappy": _snappy_chunks, "lz4": _lz4_chunks, "zstd": _zstd_chunks}
CODECS = tuple(_CHUNKERS)


def decompress(codec: str, payload: bytes, max_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES) -> bytes:
    """Decode one compressed record batch payload the way kafka-python's `<codec>_decode` does, but
    raise DecompressionLimitError past `max_bytes` of output and DecompressionError on corrupt input."""
    try:
        return _join_bounded(_CHUNKERS[codec](bytes(payload), max_bytes), max_bytes)
    except _CODEC_ERRORS as exc:
        raise DecompressionError(f"corrupt {codec} record batch: {exc!r}") from exc


_UNCOMPRESS = DefaultRecordBatch._maybe_uncompress
_UNPACK = Fetcher.PartitionRecords._unpack_records


def _uncompress_locating_batch(batch: DefaultRecordBatch) -> None:
    try:
        _UNCOMPRESS(batch)
    except DecompressionError as exc:
        exc.base_offset, exc.next_offset = batch.base_offset, batch.next_offset
        raise


def _unpack_locating_partition(self: Fetcher.PartitionRecords, tp: TopicPartition, *args: Any,
                               **kwargs: Any) -> Iterator[Any]:
    try:
        yield from _UNPACK(self, tp, *args, **kwargs)
    except DecompressionError as exc:
        exc.topic_partition = tp
        # kafka-python would keep this dead iterator as the partition's pending records, and the next
        # poll() would spin on it forever at full CPU; drained, that poll() fetches the batch again
        self.drain()
        raise


def install_bounded_decoders(max_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES) -> None:
    """Make kafka-python decode every compressed record batch (all message formats) in this process
    through `decompress`. Call before the first poll(); calling again only changes the limit.

    A batch that would inflate beyond `max_bytes` raises DecompressionLimitError, a corrupt one
    DecompressionError (its base class, a ValueError, not a KafkaError), out of KafkaConsumer.poll()
    after at most `max_bytes` (plus one 256 KiB chunk) of output. Records before the batch are
    returned first: by that poll() when any precede it in the fetch, and the error comes with the next.

    Every later poll() raises the same way (re-fetching the batch) until the caller seeks the
    partition to another offset, normally `exc.next_offset`.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    # kafka-python's record modules import the decoders by name, so each module's copy is replaced
    for codec in CODECS:
        decoder = functools.partial(decompress, codec, max_bytes=max_bytes)
        for module in (kafka.codec, kafka.record.default_records, kafka.record.legacy_records):
            if hasattr(module, f"{codec}_decode"):  # the legacy formats have no zstd
                setattr(module, f"{codec}_decode", decoder)
    DefaultRecordBatch._maybe_uncompress = _uncompress_locating_batch
    Fetcher.PartitionRecords._unpack_records = _unpack_locating_partition
