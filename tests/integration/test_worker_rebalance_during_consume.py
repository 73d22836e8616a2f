"""Messages fetched by the consume() call inside which their partition was revoked or rewound.

librdkafka runs rebalance callbacks inside consume(): a call can return messages of a
partition that the callback has just handed to another replica (which will score them too)
or rewound to its last commit (which will fetch them again). The worker must not batch them,
or their offsets get a second output. When exactly a callback fires is up to librdkafka, so
these tests make it deterministic: the real consumer, against a real broker, with the
callback run at the end of the consume() call that returned the partition's messages.
"""

from __future__ import annotations

import time

from confluent_kafka import TopicPartition

from workers.config import load_settings
from workers.kafka.telemetry_producer import produce_telemetry
from workers.pipeline import Pipeline

from .worker_harness import MODEL


class _CallbackInsideConsume:
    """The pipeline's consumer; ``during`` runs inside the first consume() that returns ``partition``."""

    def __init__(self, consumer, partition: int, during):
        self._consumer, self._partition, self._during = consumer, partition, during
        self.fired_with: list | None = None

    def consume(self, n, timeout):
        msgs = self._consumer.consume(n, timeout)
        if self.fired_with is None and any(m.error() is None and m.partition() == self._partition for m in msgs):
            self.fired_with = msgs
            self._during(self._consumer)
        return msgs

    def __getattr__(self, name):
        return getattr(self._consumer, name)


def _pipeline(bootstrap: str, topic: str) -> Pipeline:
    settings = load_settings(
        None, environ={},
        kafka={"bootstrap_servers": bootstrap, "group_id": f"g-{topic}", "input_topics": [topic],
               "replica_id": "filter"},
        topics={"scores": f"{topic}-scores", "dlq": f"{topic}-dlq", "drift": f"{topic}-drift"},
        model={"path": str(MODEL)},
    )
    pipeline = Pipeline(settings)
    pipeline.start()
    return pipeline


def _consume_until_fired(pipeline: Pipeline, spy: _CallbackInsideConsume) -> list:
    """What _consume returned from the call inside which the callback ran."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        before = spy.fired_with
        got = pipeline._consume(500, 0.2)
        if before is None and spy.fired_with is not None:
            return got
    raise AssertionError("partition 1 never returned a message")


def test_messages_of_a_partition_revoked_inside_consume_are_not_batched(bootstrap, new_topic):
    topic = new_topic(partitions=2, prefix="revoke-in-consume")
    produce_telemetry(bootstrap, topic, count=4000, seed=3)
    pipeline = _pipeline(bootstrap, topic)
    try:
        spy = _CallbackInsideConsume(
            pipeline.consumer, 1, lambda c: pipeline._on_revoke(c, [TopicPartition(topic, 1)]))
        pipeline.consumer = spy
        got = _consume_until_fired(pipeline, spy)
        fetched = [m for m in spy.fired_with if m.error() is None]
        assert any(m.partition() == 1 for m in fetched)
        assert not [m for m in got if m.partition() == 1], "messages of the revoked partition were kept"
        # The partition that stayed loses nothing of that call.
        assert [m.offset() for m in got] == [m.offset() for m in fetched if m.partition() == 0]
        assert (topic, 1) not in pipeline.snapshot().assigned
    finally:
        pipeline.request_stop()
        pipeline.consumer = getattr(pipeline.consumer, "_consumer", pipeline.consumer)
        pipeline.run()


def test_messages_of_a_partition_rewound_inside_consume_are_fetched_again_not_kept(bootstrap, new_topic):
    topic = new_topic(partitions=2, prefix="rewind-in-consume")
    produce_telemetry(bootstrap, topic, count=4000, seed=4)
    pipeline = _pipeline(bootstrap, topic)
    try:
        spy = _CallbackInsideConsume(
            pipeline.consumer, 1, lambda c: pipeline._abort_and_rewind("test", partitions={(topic, 1)}))
        pipeline.consumer = spy
        got = _consume_until_fired(pipeline, spy)
        fetched = [m for m in spy.fired_with if m.error() is None and m.partition() == 1]
        assert fetched and not [m for m in got if m.partition() == 1], "messages of the rewound partition were kept"
        # Rewound to the last commit (nothing committed: the beginning), they come again, once
        # each and in order (the call's earlier messages of the partition were dropped too).
        last = fetched[-1].offset()
        again: list[int] = []
        deadline = time.monotonic() + 30
        while (not again or again[-1] < last) and time.monotonic() < deadline:
            again += [m.offset() for m in pipeline._consume(500, 0.2) if m.partition() == 1]
        assert again and again == list(range(len(again))) and again[-1] >= last
    finally:
        pipeline.request_stop()
        pipeline.consumer = getattr(pipeline.consumer, "_consumer", pipeline.consumer)
        pipeline.run()
