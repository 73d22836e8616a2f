"""Topic administration: check input topics exist, create output topics."""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

# Metadata requests at start; a broker that is down is reported, not waited on forever.
METADATA_TIMEOUT_S = 15.0


class TopicError(RuntimeError):
    """An input topic is missing or an output topic could not be created."""


def partition_counts(admin: AdminClient, timeout: float = METADATA_TIMEOUT_S) -> dict[str, int]:
    """Partitions per existing topic; raises KafkaException when the cluster does not answer."""
    try:
        md = admin.list_topics(timeout=timeout)
    finally:
        # An admin client's librdkafka log lines (its `logger`) are only delivered by poll():
        # serve them now, or the lines saying why the metadata request failed would be lost.
        admin.poll(0)
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def ensure_topics(
    admin: AdminClient,
    topics: Iterable[str],
    partitions: int,
    replication_factor: int = -1,
    timeout: float = METADATA_TIMEOUT_S,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    existing = partition_counts(admin, timeout)
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=replication_factor) for t in missing],
        operation_timeout=timeout,
    )
    for name, fut in futures.items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            err = exc.args[0]
            if err.name() != "TOPIC_ALREADY_EXISTS":  # another replica won the race
                raise TopicError(f"cannot create topic {name!r}: {err.str()}") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(t in partition_counts(admin, timeout) for t in missing):
            return missing
        time.sleep(0.05)
    raise TopicError(f"topics {missing} were created but never appeared in metadata")
