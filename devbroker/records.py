"""Record batch v2 headers read with struct (records are never decoded on the hot
path) and control batches (transaction markers) written with struct + crc32c."""

from __future__ import annotations

import gzip
import struct
import time

from crc32c import crc32c

# baseOffset, batchLength, partitionLeaderEpoch, magic, crc, attributes,
# lastOffsetDelta, baseTimestamp, maxTimestamp, producerId, producerEpoch,
# baseSequence, recordsCount
HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_SIZE = HEADER.size  # 61
OFFSET = struct.Struct(">q")
LOG_OVERHEAD = 12  # baseOffset + batchLength
CRC_START = 21
ATTR_TRANSACTIONAL = 0x10
ATTR_CONTROL = 0x20

CONTROL_ABORT = 0
CONTROL_COMMIT = 1


class CorruptBatch(Exception):
    pass


def split_batches(data, validate_crc: bool = True) -> list[tuple]:
    """Header tuples (pos, size, *HEADER fields) of every batch in `data`.

    Raises CorruptBatch for truncated data, a magic other than 2 or a CRC mismatch."""
    mv = memoryview(data)
    n = len(mv)
    pos = 0
    out = []
    unpack = HEADER.unpack_from
    while pos < n:
        if n - pos < HEADER_SIZE:
            raise CorruptBatch("truncated batch header")
        h = unpack(mv, pos)
        size = h[1] + LOG_OVERHEAD
        if h[1] < HEADER_SIZE - LOG_OVERHEAD or pos + size > n:
            raise CorruptBatch("truncated batch")
        if h[3] != 2:
            raise CorruptBatch(f"unsupported magic {h[3]}")
        if validate_crc and crc32c(mv[pos + CRC_START:pos + size]) != h[4]:
            raise CorruptBatch("crc mismatch")
        out.append((pos, size) + h)
        pos += size
    return out


def control_batch(base_offset: int, producer_id: int, producer_epoch: int, commit: bool,
                  coordinator_epoch: int = 0, timestamp_ms: int | None = None) -> bytes:
    """One control batch holding one end-transaction marker record."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    key = struct.pack(">hh", 0, CONTROL_COMMIT if commit else CONTROL_ABORT)
    value = struct.pack(">hi", 0, coordinator_epoch)
    # record: length(varint 16) attrs(0) tsDelta(0) offsetDelta(0) keyLen(4) key valueLen(6) value headers(0)
    record = bytes((0x20, 0, 0, 0, 8)) + key + bytes((12,)) + value + b"\x00"
    after_crc = struct.pack(">hiqqqhii", ATTR_CONTROL | ATTR_TRANSACTIONAL, 0, ts, ts,
                            producer_id, producer_epoch, -1, 1) + record
    crc = crc32c(after_crc)
    batch_len = 4 + 1 + 4 + len(after_crc)
    return struct.pack(">qiibI", base_offset, batch_len, 0, 2, crc) + after_crc


def _varint(mv, pos: int) -> tuple[int, int]:
    shift = 0
    result = 0
    while True:
        b = mv[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    return (result >> 1) ^ -(result & 1), pos


def control_type(data, pos: int) -> int:
    """Marker type (0 abort, 1 commit) of the control batch at `pos` (uncompressed)."""
    mv = memoryview(data)
    p = pos + HEADER_SIZE
    _, p = _varint(mv, p)  # record length
    p += 1  # attributes
    _, p = _varint(mv, p)  # timestamp delta
    _, p = _varint(mv, p)  # offset delta
    klen, p = _varint(mv, p)
    if klen < 4:
        return -1
    return struct.unpack_from(">h", mv, p + 2)[0]


def first_record_at_or_after(batch, ts: int) -> tuple[int, int] | None:
    """(offset delta, timestamp) of the first record of `batch` (one whole batch, header
    included) whose timestamp is >= `ts`, or None if no record has one; -1 offset delta when
    the records cannot be read (a codec not available here: snappy, lz4, zstd)."""
    h = HEADER.unpack_from(batch, 0)
    attrs, base_ts, max_ts, count = h[5], h[7], h[8], h[12]
    if attrs & 0x08:  # LogAppendTime: every record carries the batch's max timestamp
        return (0, max_ts) if max_ts >= ts else None
    body = memoryview(batch)[HEADER_SIZE:]
    codec = attrs & 0x07
    if codec == 1:
        body = memoryview(gzip.decompress(body))
    elif codec != 0:
        return (0, base_ts) if base_ts >= ts else (-1, max_ts)
    pos = 0
    for _ in range(count):
        length, pos = _varint(body, pos)
        end = pos + length
        p = pos + 1  # attributes
        ts_delta, p = _varint(body, p)
        off_delta, p = _varint(body, p)
        if base_ts + ts_delta >= ts:
            return off_delta, base_ts + ts_delta
        pos = end
    return None
