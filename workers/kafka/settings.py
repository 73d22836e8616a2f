"""librdkafka settings for the worker's clients.

Each non-default setting carries a comment saying why. The pass-through table
``[kafka] client`` (security.protocol, sasl.*, ssl.*, ...) is applied to every
client, then the settings exactly-once depends on are applied on top.
"""

from __future__ import annotations

from typing import Any

from workers.config import Settings


def common(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = dict(settings.kafka.client)
    conf["bootstrap.servers"] = settings.kafka.bootstrap_servers
    conf.setdefault("client.id", f"sluice-{settings.kafka.replica_id}")
    return conf


def consumer_config(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    conf = common(settings)
    conf.update(
        {
            "group.id": k.group_id,
            # Static membership (KIP-345): a replica restarted under the same id gets its
            # partitions back without a group-wide rebalance.
            "group.instance.id": k.group_instance_id,
            # Offsets are committed only through send_offsets_to_transaction.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # Never read outputs of aborted or open transactions of upstream producers.
            "isolation.level": "read_committed",
            # A new group starts at the beginning: no event is skipped on first deployment.
            "auto.offset.reset": "earliest",
            # Incremental rebalances: partitions that stay keep flowing while others move.
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": k.session_timeout_ms,
            "heartbeat.interval.ms": max(100, k.session_timeout_ms // 5),
            "max.poll.interval.ms": k.max_poll_interval_ms,
            # Bound prefetch so memory is a function of configuration, not of lag.
            "fetch.max.bytes": k.fetch_max_bytes,
            "queued.max.messages.kbytes": k.queued_max_messages_kbytes,
            "max.partition.fetch.bytes": min(k.fetch_max_bytes, 4 * 1024 * 1024),
            # Once the prefetch queue is full librdkafka stops fetching for this long (default
            # 1000 ms); a worker that drains the queue faster then sits idle (measured: runs of
            # 200k events took 3-5 s instead of 1.4 s). Short backoff, same memory bound.
            "fetch.queue.backoff.ms": 20,
            # Per-partition lag for the metrics comes from librdkafka statistics.
            "statistics.interval.ms": 5000,
            # Partition EOF events are noise for a long-running worker.
            "enable.partition.eof": False,
        }
    )
    return conf


def producer_config(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    conf = common(settings)
    conf.update(
        {
            # Stable per replica, so a restarted replica fences its zombie (KIP-98).
            "transactional.id": k.transactional_id,
            "transaction.timeout.ms": k.transaction_timeout_ms,
            "enable.idempotence": True,
            "acks": "all",
            # Batch outputs: a transaction's records travel in few large requests.
            "linger.ms": 5,
            "batch.num.messages": 10_000,
            # Bound the producer queue; a full queue raises BufferError and the worker
            # serves delivery reports and retries, never drops.
            "queue.buffering.max.messages": 200_000,
            "queue.buffering.max.kbytes": 256 * 1024,
            # Outputs are as large as inputs; dead letters carry the original value.
            "message.max.bytes": max(1_000_000, k.fetch_max_bytes),
            "compression.type": "lz4",
        }
    )
    return conf


def admin_config(settings: Settings) -> dict[str, Any]:
    return common(settings)
