"""Transactions through librdkafka (confluent-kafka) against the test broker:
read_committed vs read_uncommitted, transactional offsets, fencing, timeouts."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from .readers import read_values




def txn_producer(bootstrap: str, tid: str, **extra) -> Producer:
    conf = {"bootstrap.servers": bootstrap, "transactional.id": tid, "linger.ms": 1}
    conf.update(extra)
    p = Producer(conf)
    p.init_transactions(15)
    return p


def test_aborted_records_invisible_to_read_committed_visible_to_read_uncommitted(bootstrap, new_topic):
    t = new_topic(partitions=2)
    p = txn_producer(bootstrap, f"tx-{t}")
    p.begin_transaction()
    for i in range(5):
        p.produce(t, b"aborted-%d" % i, partition=i % 2)
    p.flush(10)
    p.abort_transaction(10)
    p.begin_transaction()
    for i in range(3):
        p.produce(t, b"committed-%d" % i, partition=i % 2)
    p.commit_transaction(10)
    committed = read_values(bootstrap, t, "read_committed", 3, partitions=2)
    uncommitted = read_values(bootstrap, t, "read_uncommitted", 8, partitions=2)
    assert sorted(committed) == [b"committed-0", b"committed-1", b"committed-2"]
    assert sorted(uncommitted) == sorted([b"aborted-%d" % i for i in range(5)] + committed)
    # control markers take offsets: 5 aborted + 3 committed + 2 markers per partition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "wm"})
    assert sum(c.get_watermark_offsets(TopicPartition(t, p), 5)[1] for p in range(2)) == 12
    c.close()


def test_open_transaction_holds_back_read_committed_until_commit(bootstrap, new_topic):
    t = new_topic()
    plain = Producer({"bootstrap.servers": bootstrap})
    p = txn_producer(bootstrap, f"tx-{t}")
    p.begin_transaction()
    p.produce(t, b"in-txn")
    p.flush(10)
    plain.produce(t, b"after-open-txn")
    plain.flush(10)
    assert read_values(bootstrap, t, "read_committed", 0) == []
    assert sorted(read_values(bootstrap, t, "read_uncommitted", 2)) == [b"after-open-txn", b"in-txn"]
    p.commit_transaction(10)
    assert sorted(read_values(bootstrap, t, "read_committed", 2)) == [b"after-open-txn", b"in-txn"]


def _committed(bootstrap: str, group: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return c.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    finally:
        c.close()


def test_offsets_sent_in_transaction_visible_only_on_commit(bootstrap, new_topic):
    src, out = new_topic(prefix="src"), new_topic(prefix="out")
    group = f"g-{src}"
    pre = Producer({"bootstrap.servers": bootstrap})
    for i in range(10):
        pre.produce(src, b"%d" % i)
    pre.flush(10)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                         "session.timeout.ms": 6000, "heartbeat.interval.ms": 200})
    consumer.subscribe([src])
    msgs = []
    deadline = time.monotonic() + 15
    while len(msgs) < 10 and time.monotonic() < deadline:
        m = consumer.poll(0.2)
        if m is not None and not m.error():
            msgs.append(m)
    assert len(msgs) == 10
    p = txn_producer(bootstrap, f"tx-{src}")
    # aborted: offsets stay uncommitted
    p.begin_transaction()
    p.produce(out, b"x")
    p.send_offsets_to_transaction([TopicPartition(src, 0, 5)], consumer.consumer_group_metadata(), 10)
    p.abort_transaction(10)
    assert _committed(bootstrap, group, src) < 0
    # committed: offsets visible
    p.begin_transaction()
    p.produce(out, b"y")
    p.send_offsets_to_transaction([TopicPartition(src, 0, 10)], consumer.consumer_group_metadata(), 10)
    p.commit_transaction(10)
    assert _committed(bootstrap, group, src) == 10
    consumer.close()
    assert read_values(bootstrap, out, "read_committed", 1) == [b"y"]


def test_new_init_with_same_transactional_id_fences_the_zombie_and_aborts_its_txn(bootstrap, new_topic):
    t = new_topic()
    tid = f"tx-{t}"
    zombie = txn_producer(bootstrap, tid)
    zombie.begin_transaction()
    zombie.produce(t, b"zombie")
    zombie.flush(10)
    successor = txn_producer(bootstrap, tid)  # fences the zombie, aborting its open transaction
    successor.begin_transaction()
    successor.produce(t, b"successor")
    successor.commit_transaction(10)
    with pytest.raises(KafkaException) as e:
        zombie.produce(t, b"zombie-2")
        zombie.commit_transaction(10)
    assert e.value.args[0].fatal() or "fenced" in str(e.value).lower()
    assert read_values(bootstrap, t, "read_committed", 1) == [b"successor"]
    assert sorted(read_values(bootstrap, t, "read_uncommitted", 2)) == [b"successor", b"zombie"]


def test_transaction_timeout_aborts_advances_lso_and_fences_producer(broker, bootstrap, new_topic):
    t = new_topic()
    p = txn_producer(bootstrap, f"tx-{t}", **{"transaction.timeout.ms": 1000})
    p.begin_transaction()
    p.produce(t, b"too-slow")
    p.flush(10)
    began = time.monotonic()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "lso", "isolation.level": "read_committed"})
    tp = TopicPartition(t, 0)
    assert c.get_watermark_offsets(tp, 5, cached=False)[1] == 0  # LSO held by the open txn
    # Kafka looks for timed-out transactions every 10 s
    # (transaction.abort.timed.out.transaction.cleanup.interval.ms): the abort comes 1 to 11 s
    # after the transaction began. devbroker looks every 50 ms: a deliberate difference
    # (devbroker/README.md), which this test pins on devbroker.
    deadline = began + 1 + 10 + 10
    while time.monotonic() < deadline and c.get_watermark_offsets(tp, 5, cached=False)[1] == 0:
        time.sleep(0.2)
    assert c.get_watermark_offsets(tp, 5, cached=False)[1] == 2  # record + abort marker
    if broker.kind == "devbroker":
        assert time.monotonic() - began < 1 + 2.0, "devbroker aborts a timed-out transaction at once"
    c.close()
    with pytest.raises(KafkaException):
        p.commit_transaction(10)
    assert read_values(bootstrap, t, "read_committed", 0) == []
