"""devbroker partition log: raw batch storage, idempotence rules, transactions
(LSO, aborted index) and crash recovery, without a network."""

from __future__ import annotations

import os
import struct

import pytest
from crc32c import crc32c

from devbroker.log import PartitionLog, ProduceError
from devbroker.records import HEADER, control_batch, control_type, split_batches


def make_batch(n: int = 3, pid: int = -1, epoch: int = -1, seq: int = -1, txn: bool = False,
               ts: int = 1_700_000_000_000, base_offset: int = 0) -> bytes:
    """A minimal valid v2 batch of `n` uncompressed records (value b'v<i>')."""
    recs = b""
    for i in range(n):
        val = b"v%d" % i
        body = bytes([0, 0, i * 2, 1]) + bytes([len(val) * 2]) + val + b"\x00"  # attrs ts off key=null
        recs += bytes([len(body) * 2]) + body
    attrs = 0x10 if txn else 0
    after = struct.pack(">hiqqqhii", attrs, n - 1, ts, ts + n - 1, pid, epoch, seq, n) + recs
    return struct.pack(">qiibI", base_offset, 9 + len(after), 0, 2, crc32c(after)) + after


@pytest.fixture
def log(tmp_path):
    lg = PartitionLog(str(tmp_path / "p0"), "t", 0)
    yield lg
    lg.close()


def test_append_assigns_offsets_and_keeps_bytes_except_base_offset(log):
    b1 = make_batch(3)
    assert log.append(b1) == 0
    assert log.append(make_batch(2, base_offset=77)) == 3
    assert log.hw == 5
    data = log.read(0, log.hw, 1 << 20, True)
    assert data[8:len(b1)] == b1[8:]
    assert [h[2] for h in split_batches(data)] == [0, 3]


def test_read_from_middle_of_batch_and_max_bytes(log):
    for _ in range(4):
        log.append(make_batch(3))
    size = len(make_batch(3))
    assert split_batches(log.read(4, log.hw, 1 << 20, True))[0][2] == 3
    whole = log.read(0, log.hw, 1 << 20, True)
    assert len(whole) == size * 4
    # Kafka's LogSegment.read: max_bytes of the log, the last batch cut short if need be
    assert log.read(0, log.hw, size * 2 + 5, True) == whole[:size * 2 + 5]
    # first batch bigger than the limit: one whole batch when it is the first of the response,
    # else nothing (Fetch v3+ never answers a partial first batch)
    assert log.read(0, log.hw, 10, True) == whole[:size]
    assert log.read(0, log.hw, 10, False) == b""
    assert log.read(4, log.hw, size + 1, False) == whole[size:size * 2 + 1]
    # the upper bound (HW or LSO) is a batch boundary: nothing from the batch at it
    assert log.read(0, 6, 1 << 20, True) == whole[:size * 2]


def test_corrupt_batch_rejected(log):
    b = bytearray(make_batch(2))
    b[-1] ^= 0xFF
    with pytest.raises(ProduceError) as e:
        log.append(bytes(b))
    assert e.value.code == "corrupt_message"
    assert log.hw == 0


def test_idempotent_duplicate_and_out_of_order(log):
    assert log.append(make_batch(2, pid=7, epoch=0, seq=0)) == 0
    assert log.append(make_batch(2, pid=7, epoch=0, seq=2)) == 2
    assert log.append(make_batch(2, pid=7, epoch=0, seq=0)) == 0  # duplicate: original offset
    assert log.hw == 4
    with pytest.raises(ProduceError) as e:
        log.append(make_batch(2, pid=7, epoch=0, seq=9))
    assert e.value.code == "out_of_order_sequence_number"
    with pytest.raises(ProduceError) as e:
        log.append(make_batch(1, pid=7, epoch=0, seq=5))
    assert e.value.code == "out_of_order_sequence_number"
    assert log.append(make_batch(1, pid=7, epoch=1, seq=0)) == 4  # new epoch restarts at 0
    with pytest.raises(ProduceError) as e:
        log.append(make_batch(1, pid=7, epoch=0, seq=4))
    assert e.value.code == "invalid_producer_epoch"


def test_lso_and_aborted_index(log):
    log.append(make_batch(1))  # 0
    log.append(make_batch(2, pid=5, epoch=0, seq=0, txn=True))  # 1-2 open
    log.append(make_batch(1))  # 3
    assert log.lso == 1 and log.hw == 4
    assert log.read(0, log.lso, 1 << 20, True) and len(split_batches(log.read(0, log.lso, 1 << 20, True))) == 1
    log.append_marker(5, 0, commit=False)  # 4
    assert log.lso == log.hw == 5
    assert log.aborted_in(0, 5) == [(5, 1)]
    assert log.aborted_in(5, 6) == []


def test_control_batch_is_valid():
    b = control_batch(42, 9, 3, commit=True, coordinator_epoch=1)
    (h,) = split_batches(b)
    assert h[2] == 42 and h[7] & 0x30 == 0x30 and h[11] == 9 and h[12] == 3
    assert control_type(b, 0) == 1
    assert control_type(control_batch(0, 9, 3, commit=False), 0) == 0


def test_recovery_rebuilds_state_and_truncates_torn_tail(tmp_path):
    d = str(tmp_path / "p0")
    lg = PartitionLog(d, "t", 0)
    lg.append(make_batch(2, pid=3, epoch=0, seq=0))
    lg.append(make_batch(1, pid=4, epoch=0, seq=0, txn=True))
    lg.append(make_batch(1, pid=5, epoch=0, seq=0, txn=True))
    lg.append_marker(5, 0, commit=False)
    size = lg.size
    lg.close()
    with open(lg.path, "ab") as f:  # a torn write, as after SIGKILL mid-append
        f.write(make_batch(3)[:30])
    lg2 = PartitionLog(d, "t", 0)
    assert os.path.getsize(lg2.path) == size
    assert lg2.hw == 5
    assert lg2.open_txns == {4: 2}
    assert lg2.lso == 2
    assert lg2.aborted_in(0, 10) == [(5, 3)]
    assert lg2.append(make_batch(2, pid=3, epoch=0, seq=0)) == 0  # duplicate still detected
    assert lg2.append(make_batch(1, pid=3, epoch=0, seq=2)) == 5
    lg2.close()


def test_header_layout_is_61_bytes():
    assert HEADER.size == 61
