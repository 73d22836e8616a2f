"""Rewinding after an abort, on a consumer that still holds its partitions and on one fenced
as a static member (workers/kafka/rewind.py), through real clients on the session's broker.

The fenced case is what ended a duplicate replica with exit 75 in a CI chaos run: its
transaction failed (TxnOffsetCommit answered FENCED_INSTANCE_ID), the abort's rewind
sought partitions librdkafka had already taken away, and ``seek`` raised ``_STATE``.
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

from workers.kafka.rewind import held_partitions, rewind_to_committed

WAIT_S = 30.0


def _static_consumer(bootstrap: str, group: str, topic: str, errors: list) -> Consumer:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "group.instance.id": "r0",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest",
                  "partition.assignment.strategy": "cooperative-sticky", "session.timeout.ms": 6000,
                  "heartbeat.interval.ms": 500, "error_cb": errors.append})
    c.subscribe([topic])
    return c


def test_rewind_seeks_held_partitions_and_leaves_fenced_ones(bootstrap, new_topic):
    topic = new_topic(partitions=3, prefix="rewind")
    group = f"g-rewind-{uuid.uuid4().hex[:8]}"
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(30):
        p.produce(topic, f"e{i}".encode(), partition=i % 3)
    assert p.flush(10) == 0

    errors_a: list = []
    a = _static_consumer(bootstrap, group, topic, errors_a)
    read = 0
    deadline = time.monotonic() + WAIT_S
    while read < 30:
        assert time.monotonic() < deadline, f"read {read} of 30 records"
        m = a.poll(0.1)
        if m is not None and not m.error():
            read += 1
    # Commit offset 4 on partition 0, nothing on 1 and 2; the consumer has read past both.
    a.commit(offsets=[TopicPartition(topic, 0, 4)], asynchronous=False)
    targets = {(topic, 0), (topic, 1), (topic, 2)}
    assert rewind_to_committed(a, targets, 10.0) == []
    first = {}
    deadline = time.monotonic() + WAIT_S
    while len(first) < 3:
        assert time.monotonic() < deadline, f"rewound partitions not read again: {first}"
        m = a.poll(0.2)
        if m is not None and not m.error() and m.partition() not in first:
            first[m.partition()] = m.offset()
    assert first == {0: 4, 1: 0, 2: 0}, "a held partition resumes at its committed offset (or the beginning)"

    # Another process joins with the same group.instance.id: the first consumer is fenced, and
    # librdkafka drops its assignment. Its rewind must leave those partitions alone, not fail.
    errors_b: list = []
    b = _static_consumer(bootstrap, group, topic, errors_b)
    deadline = time.monotonic() + WAIT_S
    while held_partitions(a):
        assert time.monotonic() < deadline, "the first consumer was never fenced"
        b.poll(0.1)
        a.poll(0.1)
    assert sorted(rewind_to_committed(a, targets, 10.0)) == sorted(targets)
    a.close()
    b.close()
