"""Admin operations through confluent_kafka.admin.AdminClient against the test broker."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic


def test_create_describe_list_delete_topic(broker, bootstrap):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    name = f"admin-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1)])[name].result(10)
    if broker.kind == "devbroker":  # a deliberate difference: devbroker/README.md
        assert name in admin.list_topics(timeout=10).topics
    with pytest.raises(KafkaException) as e:
        admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(10)
    assert e.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS
    # Kafka answers CreateTopics once the controller has the topic; brokers learn it from the
    # metadata log a moment later, so Metadata may not list it yet (devbroker lists it at once).
    deadline = time.monotonic() + 10
    while name not in (md := admin.list_topics(timeout=10)).topics and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(md.topics[name].partitions) == 3
    assert md.cluster_id and len(md.brokers) == 1
    res = ConfigResource(ConfigResource.Type.TOPIC, name)
    configs = admin.describe_configs([res])[res].result(10)
    assert configs["cleanup.policy"].value == "delete"
    admin.delete_topics([name], operation_timeout=10)[name].result(10)
    deadline = time.monotonic() + 10
    while name in admin.list_topics(timeout=10).topics and time.monotonic() < deadline:
        time.sleep(0.1)
    assert name not in admin.list_topics(timeout=10).topics


def test_list_offsets_earliest_latest_and_by_timestamp(bootstrap, new_topic):
    t = new_topic()
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    base = int(time.time() * 1000) - 10_000
    for i in range(10):
        p.produce(t, b"%d" % i, timestamp=base + i * 1000)
        p.flush(10)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "lo"})
    assert c.get_watermark_offsets(TopicPartition(t, 0), 5, cached=False) == (0, 10)
    found = c.offsets_for_times([TopicPartition(t, 0, base + 4500)], 10)
    assert found[0].offset == 5
    found = c.offsets_for_times([TopicPartition(t, 0, base + 60_000)], 10)
    assert found[0].offset == -1
    c.close()


@pytest.mark.parametrize("reset", ["earliest", "error"])
def test_out_of_range_fetch_is_reset_by_auto_offset_reset(bootstrap, new_topic, reset):
    """An OFFSET_OUT_OF_RANGE fetch answer must be parseable (empty, not null, records) so
    librdkafka applies auto.offset.reset: earliest rewinds to 0, error reports it."""
    t = new_topic()
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(3):
        p.produce(t, b"v%d" % i)
    assert p.flush(10) == 0
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"oor-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": reset, "enable.auto.commit": False})
    c.assign([TopicPartition(t, 0, 100)])
    got = None
    deadline = time.monotonic() + 10
    while got is None and time.monotonic() < deadline:
        got = c.poll(0.2)
    c.close()
    assert got is not None, "no record and no error after an out-of-range fetch"
    if reset == "earliest":
        assert got.error() is None and got.offset() == 0 and got.value() == b"v0"
    else:
        assert got.error() is not None and got.error().code() == KafkaError._AUTO_OFFSET_RESET


def test_batches_above_max_message_bytes_are_rejected_unless_the_topic_allows_them(bootstrap):
    """Kafka rejects a record batch larger than the topic's max.message.bytes (default: the
    broker's message.max.bytes, 1048588) with MESSAGE_TOO_LARGE, whatever the producer's own
    message.max.bytes; a topic created with a larger max.message.bytes takes it."""
    a = AdminClient({"bootstrap.servers": bootstrap})
    small, large = f"mmb-default-{uuid.uuid4().hex[:8]}", f"mmb-raised-{uuid.uuid4().hex[:8]}"
    fs = a.create_topics([NewTopic(small, 1, 1),
                          NewTopic(large, 1, 1, config={"max.message.bytes": str(4 * 1024 * 1024)})])
    for f in fs.values():
        f.result()
    p = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 8 * 1024 * 1024,
                  "compression.type": "none"})
    results: dict[str, object] = {}
    for t in (small, large):
        p.produce(t, b"x" * (2 * 1024 * 1024),
                  on_delivery=lambda e, m, t=t: results.__setitem__(t, e.code() if e else m.offset()))
    p.flush(20)
    assert results == {small: KafkaError.MSG_SIZE_TOO_LARGE, large: 0}


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_list_offsets_by_timestamp_is_exact_inside_a_batch(bootstrap, new_topic, compression):
    """Kafka answers ListOffsets(timestamp) with the first *record* whose timestamp is >= the
    target and that record's timestamp, also when many records share one batch."""
    from confluent_kafka.admin import OffsetSpec

    t = new_topic()
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 200, "compression.type": compression})
    base = int(time.time() * 1000) - 10_000
    for i in range(10):
        p.produce(t, b"record-%d-" % i * 20, timestamp=base + i * 10)
    assert p.flush(10) == 0
    a = AdminClient({"bootstrap.servers": bootstrap})

    def lookup(spec):
        r = a.list_offsets({TopicPartition(t, 0): spec})
        x = list(r.values())[0].result()
        return x.offset, x.timestamp

    assert lookup(OffsetSpec.for_timestamp(base + 15)) == (2, base + 20)
    assert lookup(OffsetSpec.for_timestamp(base + 50)) == (5, base + 50)
    assert lookup(OffsetSpec.for_timestamp(base + 91)) == (-1, -1)
    assert lookup(OffsetSpec.max_timestamp()) == (9, base + 90)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "lo-exact"})
    assert c.offsets_for_times([TopicPartition(t, 0, base + 35)], 10)[0].offset == 4
    c.close()
