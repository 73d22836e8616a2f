"""A transactional call stuck inside librdkafka: the producer is abandoned (outcome unknown),
kept until the call returns, then released; more than MAX_ABANDONED_PRODUCERS stuck at once
ends the process (TransactionStuck). The client under the wrapper is replaced by a stand-in
whose send_offsets_to_transaction blocks, as librdkafka's did after broker restarts."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import TopicPartition

from workers.kafka import producer as mod
from workers.kafka.producer import IndefiniteOutcome, TransactionalProducer, TransactionStuck


class _StuckClient:
    """send_offsets_to_transaction blocks until released (ignoring its timeout)."""

    def __init__(self):
        self.release = threading.Event()
        self.nudges = 0

    def send_offsets_to_transaction(self, offsets, metadata, timeout):
        self.release.wait()

    def list_topics(self, timeout=None):
        self.nudges += 1

    def flush(self, timeout=None):
        return 0


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(mod, "SEND_OFFSETS_TIMEOUT_S", 0.3)
    monkeypatch.setattr(mod, "SEND_OFFSETS_GRACE_S", 0.1)
    monkeypatch.setattr(mod, "NUDGE_AFTER_S", 0.1)
    monkeypatch.setattr(mod, "NUDGE_INTERVAL_S", 0.1)
    monkeypatch.setattr(mod, "_ABANDONED", [])


def _stuck_producer() -> tuple[TransactionalProducer, _StuckClient]:
    p = TransactionalProducer({"bootstrap.servers": "127.0.0.1:1", "transactional.id": "t"}, faults=None)
    client = _StuckClient()
    p._producer = client
    p.in_transaction = True
    return p, client


def _commit(p: TransactionalProducer) -> None:
    p.commit([TopicPartition("t", 0, 1)], object(), timeout=5.0)


def test_a_stuck_send_offsets_abandons_the_producer_with_an_unknown_outcome():
    p, client = _stuck_producer()
    started = time.monotonic()
    with pytest.raises(IndefiniteOutcome, match="abandoning this producer"):
        _commit(p)
    assert time.monotonic() - started < 2.0  # the send_offsets deadline, not the commit's 5 s
    assert p.outcome_unknown and p.failed
    assert client.nudges >= 1  # metadata was refreshed while it waited
    p.close()
    assert len(mod._ABANDONED) == 1  # kept: the call is still inside the client
    client.release.set()
    time.sleep(0.1)
    mod._reap_abandoned()
    assert mod._ABANDONED == []  # released once the call returned


def test_more_stuck_at_once_than_the_limit_ends_the_process_but_released_ones_do_not_count():
    held = []
    for _ in range(mod.MAX_ABANDONED_PRODUCERS):
        p, client = _stuck_producer()
        with pytest.raises(IndefiniteOutcome):
            _commit(p)
        p.close()
        held.append(client)
    p, client = _stuck_producer()
    with pytest.raises(TransactionStuck):
        _commit(p)
    held[0].release.set()  # one returns: there is room again
    time.sleep(0.1)
    p, client = _stuck_producer()
    with pytest.raises(IndefiniteOutcome):
        _commit(p)
    for c in held:
        c.release.set()
