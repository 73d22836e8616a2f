"""A transactional call stuck inside librdkafka: the producer is abandoned (outcome unknown),
kept until the call returns, then released; more than MAX_ABANDONED_PRODUCERS stuck at once
ends the process (TransactionStuck). The client under the wrapper is replaced by a stand-in
whose send_offsets_to_transaction blocks, as librdkafka's did after broker restarts."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

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


def test_a_stop_deadline_set_while_a_call_waits_ends_the_wait_at_that_deadline(monkeypatch):
    """SIGTERM during a stuck commit: the signal handler sets stop_by while the commit waits;
    the wait ends there (not at the call's own deadline), the producer is given up, and at a stop
    the abandoned-producer limit does not turn that into TransactionStuck (exit 75)."""
    monkeypatch.setattr(mod, "SEND_OFFSETS_TIMEOUT_S", 30.0)
    held = []
    for _ in range(mod.MAX_ABANDONED_PRODUCERS):  # the limit is reached already
        p, client = _stuck_producer()
        p.stop_by = time.monotonic() + 0.1
        with pytest.raises(IndefiniteOutcome):
            _commit(p)
        p.close()
        held.append(client)
    p, client = _stuck_producer()
    threading.Timer(0.3, lambda: setattr(p, "stop_by", time.monotonic() + 0.2)).start()
    started = time.monotonic()
    with pytest.raises(IndefiniteOutcome, match="stop deadline"):
        _commit(p)
    took = time.monotonic() - started
    assert 0.45 <= took < 0.5 + 2 * mod.STOP_CHECK_INTERVAL_S, took
    assert p.outcome_unknown and p.failed
    p.close()
    assert mod.stuck_producers() == len(held) + 1  # kept until their calls return
    for c in [*held, client]:
        c.release.set()
    time.sleep(0.1)
    assert mod.stuck_producers() == 0


def test_without_a_stop_deadline_a_call_keeps_its_own(monkeypatch):
    p, client = _stuck_producer()
    p.stop_by = None
    started = time.monotonic()
    with pytest.raises(IndefiniteOutcome, match="did not return within"):
        _commit(p)
    assert 0.35 <= time.monotonic() - started < 1.5
    client.release.set()


def test_a_call_is_not_started_once_the_stop_deadline_has_passed():
    p, client = _stuck_producer()
    p.stop_by = time.monotonic() - 0.01
    started = time.monotonic()
    with pytest.raises(IndefiniteOutcome, match="not started"):
        _commit(p)
    assert time.monotonic() - started < 0.1
    p.close()
    assert mod.stuck_producers() == 0  # no call is inside the client
    client.release.set()


class _RefusingClient:
    """abort_transaction fails as librdkafka's did (issue #4849): EndTxn refused, fatal."""

    def abort_transaction(self, timeout):
        raise KafkaException(KafkaError(KafkaError.INVALID_TXN_STATE, "Failed to end transaction: Broker: Producer "
                                        "attempted a transactional operation in an invalid state", fatal=True))

    def poll(self, timeout=None):
        return 0

    def flush(self, timeout=None):
        return 0


def test_an_end_txn_refused_as_invalid_state_asks_for_a_new_producer_not_an_exit():
    p = TransactionalProducer({"bootstrap.servers": "127.0.0.1:1", "transactional.id": "t"}, faults=None)
    p._producer = _RefusingClient()
    p.in_transaction = True
    with pytest.raises(IndefiniteOutcome, match="INVALID_TXN_STATE|invalid state"):
        p.abort(timeout=1.0)
    assert p.outcome_unknown and p.failed  # the worker renews it (a new epoch aborts the transaction)
