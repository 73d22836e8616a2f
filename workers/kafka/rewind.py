"""Rewinding a consumer to its group's committed offsets after an aborted transaction.

After an abort, every partition this replica still holds must be read again from its last
committed offset, or the aborted events would be skipped. A partition the consumer no
longer holds has no position to restore: its next owner (or this consumer, once it is
assigned again) starts from the committed offset anyway. That happens when the consumer
was fenced as a static member (another process joined with the same ``group.instance.id``):
librdkafka clears the assignment at once, and ``seek`` answers ``_STATE``, before the fatal
error reaches ``poll``. Treating that as a failed rewind made a duplicate replica exit 75
(a chaos run in CI) where it should have carried on until its producer was fenced (exit 3).
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, Consumer, KafkaException, TopicPartition


class RewindFailed(Exception):
    """The committed offsets could not be read, or a partition still held could not be sought:
    left at its position, it would skip the aborted events."""


def held_partitions(consumer: Consumer) -> set[tuple[str, int]]:
    """The partitions in the consumer's current assignment (empty once it is fenced)."""
    return {(tp.topic, tp.partition) for tp in consumer.assignment()}


def rewind_to_committed(consumer: Consumer, targets: Iterable[tuple[str, int]],
                        timeout: float) -> list[tuple[str, int]]:
    """Seek each target the consumer still holds to its committed offset (the beginning where
    nothing is committed); return the targets it no longer holds, which were left alone.

    Raises :class:`RewindFailed` when the committed offsets cannot be read within ``timeout``
    (guessing "nothing committed" would re-score committed events) or when a partition still
    held cannot be sought.
    """
    tps = [TopicPartition(t, p) for t, p in sorted(set(targets))]
    if not tps:
        return []
    try:
        committed = consumer.committed(tps, timeout=timeout)
    except KafkaException as exc:
        raise RewindFailed(f"cannot read committed offsets to rewind: {exc}") from exc
    not_held: list[tuple[str, int]] = []
    for tp in committed:
        if tp.error is not None:
            raise RewindFailed(f"cannot read the committed offset of {tp.topic}[{tp.partition}]: {tp.error.str()}")
        if tp.offset == OFFSET_INVALID or tp.offset < 0:
            tp.offset = OFFSET_BEGINNING  # nothing committed yet for this partition
        try:
            consumer.seek(tp)
        except KafkaException as exc:
            # Asked only after a failure: assignment() is a call into librdkafka, and the
            # common case (held, sought) needs none.
            if (tp.topic, tp.partition) not in held_partitions(consumer):
                not_held.append((tp.topic, tp.partition))
                continue
            raise RewindFailed(f"cannot rewind {tp.topic}[{tp.partition}]: {exc}") from exc
    return not_held
