"""Partition logs: one append-only file of raw record batches per partition,
an in-memory index of batch positions, and the partition's producer state
(idempotent sequences, open transactions, aborted-transaction index, LSO).
Everything is rebuilt on start by scanning batch headers."""

from __future__ import annotations

import asyncio
import bisect
import os
import struct
import time

from crc32c import crc32c

from .records import (ATTR_CONTROL, ATTR_TRANSACTIONAL, CONTROL_COMMIT, CRC_START, HEADER,
                      HEADER_SIZE, LOG_OVERHEAD, CorruptBatch, control_batch, control_type,
                      first_record_at_or_after, split_batches)

_pack_offset = struct.Struct(">q").pack_into
ATTR_LOG_APPEND_TIME = 0x08
INT32_MAX = 0x7FFFFFFF
RECENT_BATCHES = 5  # like Kafka, duplicates are detected among the last 5 batches


class ProduceError(Exception):
    """Carries a kio ErrorCode name for the partition's produce response."""

    def __init__(self, code: str, message: str | None = None):
        super().__init__(message or code)
        self.code = code
        self.message = message


class ProducerEntry:
    __slots__ = ("epoch", "last_seq", "recent")

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.last_seq = -1  # -1: no sequence seen at this epoch
        self.recent: list[tuple[int, int, int]] = []  # (first_seq, last_seq, base_offset)


class PartitionLog:
    def __init__(self, directory: str, topic: str, partition: int):
        self.topic = topic
        self.partition = partition
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "00000000000000000000.log")
        self.bases: list[int] = []  # base offset of each batch
        self.positions: list[int] = []  # file position of each batch
        self.max_ts: list[int] = []  # running max of max timestamps (monotonic for bisect)
        self.size = 0  # file size = end of the last batch
        self.hw = 0  # next offset (high watermark: single replica)
        self.log_start = 0
        self.producers: dict[int, ProducerEntry] = {}
        self.open_txns: dict[int, int] = {}  # producer id -> first offset of its open txn
        self.aborted: list[tuple[int, int, int]] = []  # (last offset, producer id, first offset)
        self.waiters: set[asyncio.Future] = set()
        self._recover()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)

    # ---- recovery -------------------------------------------------------------------------
    def _recover(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        mv = memoryview(data)
        n = len(data)
        pos = 0
        unpack = HEADER.unpack_from
        while pos < n:
            if n - pos < HEADER_SIZE:
                break
            h = unpack(mv, pos)
            size = h[1] + LOG_OVERHEAD
            if h[1] < HEADER_SIZE - LOG_OVERHEAD or pos + size > n or h[3] != 2:
                break
            if crc32c(mv[pos + CRC_START:pos + size]) != h[4]:
                break
            self._index(pos, size, h, data)
            pos += size
        if pos < n:  # torn trailing write (e.g. after SIGKILL): drop it
            with open(self.path, "r+b") as f:
                f.truncate(pos)

    def _index(self, pos: int, size: int, h: tuple, data, data_pos: int | None = None) -> None:
        base, _, _, _, _, attrs, last_delta, _, max_ts, pid, epoch, base_seq, _ = h
        self.bases.append(base)
        self.positions.append(pos)
        self.max_ts.append(max(max_ts, self.max_ts[-1]) if self.max_ts else max_ts)
        self.size = pos + size
        self.hw = base + last_delta + 1
        if pid < 0:
            return
        if attrs & ATTR_CONTROL:
            commit = control_type(data, pos if data_pos is None else data_pos) == CONTROL_COMMIT
            self._apply_marker(pid, epoch, commit, base)
            return
        e = self.producers.get(pid)
        if e is None or e.epoch != epoch:
            e = self.producers[pid] = ProducerEntry(epoch)
        if base_seq >= 0:
            last_seq = (base_seq + last_delta) & INT32_MAX
            e.last_seq = last_seq
            e.recent.append((base_seq, last_seq, base))
            if len(e.recent) > RECENT_BATCHES:
                del e.recent[0]
        if attrs & ATTR_TRANSACTIONAL and pid not in self.open_txns:
            self.open_txns[pid] = base

    def _apply_marker(self, pid: int, epoch: int, commit: bool, offset: int) -> None:
        e = self.producers.get(pid)
        if e is None or e.epoch != epoch:
            self.producers[pid] = ProducerEntry(epoch)
        first = self.open_txns.pop(pid, None)
        if first is not None and not commit:
            self.aborted.append((offset, pid, first))

    # ---- state -------------------------------------------------------------------------------
    @property
    def lso(self) -> int:
        if self.open_txns:
            return min(self.open_txns.values())
        return self.hw

    def _wake(self) -> None:
        if self.waiters:
            for w in self.waiters:
                if not w.done():
                    w.set_result(None)
            self.waiters.clear()

    # ---- writes ------------------------------------------------------------------------------
    def append(self, data, txn_check=None, max_batch_bytes: int = 0, max_future_ms: int = -1) -> int:
        """Append the batches in `data`, returning the base offset assigned.

        A batch larger than `max_batch_bytes` (when > 0: the topic's max.message.bytes) is
        MESSAGE_TOO_LARGE, as Kafka checks it. Idempotent duplicates return the original
        base offset without appending.
        `txn_check(pid, epoch)` is called for transactional batches and may raise ProduceError."""
        try:
            batches = split_batches(data)
        except CorruptBatch as e:
            raise ProduceError("corrupt_message", str(e)) from None
        if not batches:
            raise ProduceError("corrupt_message", "empty records")
        buf = None
        next_offset = self.hw
        first_base = -1
        staged = []
        if max_batch_bytes > 0:
            for b in batches:
                if b[1] > max_batch_bytes:
                    raise ProduceError("message_too_large",
                                       f"batch of {b[1]} bytes exceeds max.message.bytes {max_batch_bytes}")
        if max_future_ms >= 0:  # Kafka's message.timestamp.after.max.ms, for CreateTime batches
            limit = int(time.time() * 1000) + max_future_ms
            for b in batches:
                if not b[7] & ATTR_LOG_APPEND_TIME and b[10] > limit:
                    raise ProduceError("invalid_timestamp",
                                       f"timestamp {b[10]} is more than {max_future_ms} ms in the future")
        for b in batches:
            pos, size, _, _, _, _, _, attrs, last_delta, _, _, pid, epoch, base_seq, _ = b
            if attrs & ATTR_CONTROL:
                raise ProduceError("invalid_record", "clients may not write control batches")
            if pid >= 0:
                if attrs & ATTR_TRANSACTIONAL and txn_check is not None:
                    txn_check(pid, epoch)
                dup = self._check_sequence(pid, epoch, base_seq, last_delta)
                if dup is not None:
                    if len(batches) == 1:
                        return dup
                    continue
            if buf is None:
                buf = bytearray(data)
            _pack_offset(buf, pos, next_offset)
            staged.append((pos, size, next_offset, b))
            if first_base < 0:
                first_base = next_offset
            next_offset += last_delta + 1
        if not staged:
            return first_base
        if len(staged) != len(batches):
            out = bytearray()
            for pos, size, _, _ in staged:
                out += buf[pos:pos + size]
            buf = out
            rel = 0
            restaged = []
            for pos, size, base, b in staged:
                restaged.append((rel, size, base, b))
                rel += size
            staged = restaged
        self._write(buf)
        file_pos = self.size
        for pos, size, base, b in staged:
            h = (base,) + b[3:]
            self._index(file_pos + pos, size, h, buf, pos)
        self._wake()
        return first_base

    def _check_sequence(self, pid: int, epoch: int, base_seq: int, last_delta: int) -> int | None:
        """Kafka's idempotence rules; returns the original base offset of a duplicate."""
        e = self.producers.get(pid)
        if e is None:
            return None
        if epoch < e.epoch:
            raise ProduceError("invalid_producer_epoch",
                               f"producer epoch {epoch} is older than {e.epoch}")
        last_seq = (base_seq + last_delta) & INT32_MAX
        if epoch > e.epoch:
            if base_seq != 0:
                raise ProduceError("out_of_order_sequence_number",
                                   f"new epoch {epoch} must start at sequence 0, got {base_seq}")
            return None
        for first, last, base in e.recent:
            if first == base_seq and last == last_seq:
                return base
        if e.last_seq < 0:
            if base_seq != 0:
                raise ProduceError("out_of_order_sequence_number",
                                   f"expected sequence 0, got {base_seq}")
            return None
        expected = 0 if e.last_seq == INT32_MAX else e.last_seq + 1
        if base_seq != expected:
            raise ProduceError("out_of_order_sequence_number",
                               f"expected sequence {expected}, got {base_seq}")
        return None

    def append_marker(self, pid: int, epoch: int, commit: bool, coordinator_epoch: int = 0) -> int:
        offset = self.hw
        batch = control_batch(offset, pid, epoch, commit, coordinator_epoch)
        self._write(batch)
        h = HEADER.unpack_from(batch, 0)
        self._index(self.size, len(batch), h, batch, 0)
        self._wake()
        return offset

    def _write(self, data) -> None:
        mv = memoryview(data)
        while mv:
            n = os.write(self.fd, mv)
            mv = mv[n:]

    # ---- reads -------------------------------------------------------------------------------
    def read(self, offset: int, upper: int, max_bytes: int, must_return_one: bool) -> bytes:
        """Kafka's LogSegment.read: the log's bytes from the batch holding `offset` up to the
        batch at `upper` (HW or LSO), at most `max_bytes` of them, so the last batch may be cut
        short (clients drop a partial trailing batch); when `must_return_one` (the first
        partition of the response to hold data) at least the whole first batch. A first batch
        larger than `max_bytes` otherwise gives nothing (Fetch v3+ answers an empty set rather
        than a partial first batch)."""
        bases = self.bases
        if offset >= upper or not bases:
            return b""
        i = bisect.bisect_right(bases, offset) - 1
        if i < 0:
            i = 0
        # the batch at i may end before offset (offset in a gap or beyond): move on
        nb = len(bases)
        if i + 1 < nb and bases[i + 1] <= offset:
            i += 1
        j = bisect.bisect_left(bases, upper, i)  # batches [i, j) have base < upper
        if j <= i:
            return b""
        positions = self.positions
        start = positions[i]
        end = positions[j] if j < nb else self.size
        first = (positions[i + 1] if i + 1 < nb else self.size) - start
        limit = max(max_bytes, first) if must_return_one else max_bytes
        if limit < first:
            return b""
        return os.pread(self.fd, min(end - start, limit), start)

    def aborted_in(self, start: int, end: int) -> list[tuple[int, int]]:
        """(producer id, first offset) of aborted txns overlapping [start, end)."""
        out = []
        ab = self.aborted
        i = bisect.bisect_left(ab, (start, -1, -1))
        for last, pid, first in ab[i:]:
            if first < end:
                out.append((pid, first))
        return out

    def offset_for_timestamp(self, ts: int) -> tuple[int, int]:
        """(offset, timestamp) of the first record whose timestamp is >= `ts`, as Kafka's
        ListOffsets answers; (-1, -1) when there is none. Records are decoded only in the one
        batch found (uncompressed or gzip); for other codecs the batch's base offset is given
        unless its first record already qualifies (then it is exact)."""
        i = bisect.bisect_left(self.max_ts, ts)
        n = len(self.bases)
        while i < n:
            start = self.positions[i]
            end = self.positions[i + 1] if i + 1 < n else self.size
            found = first_record_at_or_after(os.pread(self.fd, end - start, start), ts)
            if found is not None:
                delta, rts = found
                return max(self.bases[i] + max(delta, 0), self.log_start), rts
            i += 1  # running maximum reached by an earlier batch: look further
        return -1, -1

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
