"""The pipe transport's reader never blocks: a frame that arrives in pieces (a writer stopped or
slow halfway) comes back whole once complete, and nothing before. Real pipes, no processes."""

from __future__ import annotations

import os
import struct
import threading
from multiprocessing import Pipe

import pytest

from workers.inference.pipes import FrameReader, frame, task_frame


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_a_frame_arriving_in_pieces_is_returned_only_when_whole(pipe):
    r, w = pipe
    reader = FrameReader(r)
    data = frame(b"x" * 1000)
    assert reader.read() is None and not reader.progressed
    os.write(w, data[:2])  # half a header
    assert reader.read() is None and reader.progressed
    os.write(w, data[2:500])
    assert reader.read() is None and reader.progressed
    assert reader.read() is None and not reader.progressed  # nothing new: no progress
    os.write(w, data[500:])
    assert reader.read() == b"x" * 1000
    assert reader.read() is None


def test_frames_written_back_to_back_come_out_one_by_one_in_order(pipe):
    r, w = pipe
    reader = FrameReader(r)
    os.write(w, frame(b"one") + frame(b"") + struct.pack("!iQ", -1, 5) + b"three" + frame(b"four"))
    assert [reader.read() for _ in range(5)] == [b"one", b"", b"three", b"four", None]


def test_a_writer_gone_halfway_is_eof_not_a_hang(pipe):
    r, w = pipe
    reader = FrameReader(r)
    os.write(w, frame(b"y" * 100)[:50])
    assert reader.read() is None
    os.close(w)
    with pytest.raises(EOFError):
        reader.read()


def test_reads_what_multiprocessing_connection_writes_larger_than_the_pipe():
    reader_conn, writer_conn = Pipe(duplex=False)
    os.set_blocking(reader_conn.fileno(), False)
    payloads = [os.urandom(3 << 20), b"small", os.urandom(70_000)]
    sender = threading.Thread(target=lambda: [writer_conn.send_bytes(p) for p in payloads])
    sender.start()
    reader, got = FrameReader(reader_conn.fileno()), []
    while len(got) < len(payloads):
        message = reader.read()
        if message is not None:
            got.append(message)
    sender.join(10)
    assert got == payloads
    reader_conn.close()
    writer_conn.close()


def test_a_task_frame_carries_its_generation_before_the_pickle():
    body = task_frame(7, b"pickled")
    assert struct.unpack_from("!iq", body) == (len(b"pickled") + 8, 7) and body.endswith(b"pickled")
