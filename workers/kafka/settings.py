"""Kafka client settings: librdkafka's for the worker, aiokafka's for the drift aggregator.

Each non-default setting carries a comment saying why. The pass-through table
``[kafka] client`` (security.protocol, sasl.*, ssl.*, ...) is applied to every
client, then the settings exactly-once depends on are applied on top.

Memory: every librdkafka buffer of the worker is sized from its settings
(:func:`buffer_sizes`), so peak RSS is a function of the configuration (and of the
partitions assigned), not of lag or backlog. librdkafka's own defaults (a fetch of up to
50 MiB, 100k messages prefetched per partition, a producer queue of 100k messages / 1 GiB)
made a worker grow by ~140 MiB once a backlog was deep enough to fill them
(tests/integration/test_worker_memory.py measures it).
"""

from __future__ import annotations

import ssl
from dataclasses import asdict, dataclass
from typing import Any

from workers.config import ConfigError, Settings
from workers.logs import kafka_logger


# ------------------------------------------------------------------------ buffer sizes

#: Bytes an input event is budgeted when fetch sizes are derived from batch sizes. Security
#: telemetry events are 0.3-1 KiB of JSON; a larger event costs more fetches, never a stall
#: (a broker always returns at least one record batch, whatever the fetch limits).
EVENT_FETCH_BYTES = 1024
#: Full batches per partition that librdkafka keeps prefetched (queued.min.messages): the next
#: batch can close from memory while the fetch after it is on the wire.
PREFETCH_BATCHES = 2
#: Smallest per-partition fetch: below this, request overheads dominate at small batch sizes.
MIN_PARTITION_FETCH_BYTES = 64 * 1024
#: librdkafka's default message.max.bytes; a consumer's fetch.max.bytes may not be below its
#: message.max.bytes, so this is the smallest fetch.max.bytes unless [kafka] fetch_max_bytes is.
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
#: Full batches of outputs the producer queue holds (records emitted, not yet acknowledged).
#: A full queue throttles emission (the producer wrapper serves delivery reports and retries;
#: nothing is dropped), so the queue need only keep produce requests flowing.
PRODUCER_QUEUE_BATCHES = 16
#: Records per produce request (batch.num.messages), and so the smallest producer queue: a full
#: request must fit in the queue.
PRODUCER_BATCH_MESSAGES = 10_000
#: Room for a dead letter's headers (reason, detail, source, the original headers) above its
#: value and key, which are cut to [topics] dlq_max_value_bytes.
DLQ_HEADERS_ALLOWANCE = 64 * 1024


@dataclass(frozen=True)
class BufferSizes:
    """librdkafka's buffer limits for one worker process, derived from its settings."""

    fetch_max_bytes: int              # one fetch response, all partitions
    partition_fetch_bytes: int        # one partition's share of a fetch response
    prefetch_messages: int            # queued.min.messages: per assigned partition
    prefetch_kbytes: int              # queued.max.messages.kbytes: the whole prefetch queue
    producer_queue_messages: int
    producer_queue_kbytes: int
    message_max_bytes: int            # the largest record the producer may send

    def as_dict(self) -> dict[str, int]:
        """The sizes by name (for logs and ``sluice check-config``)."""
        return asdict(self)


def buffer_sizes(settings: Settings) -> BufferSizes:
    """Every librdkafka buffer limit of the worker, as a function of its settings.

    Prefetch is sized in events from the batch settings ([batching] max_batch_size,
    max_inflight_batches) and capped in bytes by [kafka] fetch_max_bytes and
    queued_max_messages_kbytes; the producer queue holds a bounded number of batches of outputs
    and at most as many bytes as the prefetch budget, but always one record of the largest size
    the worker may produce (a dead letter of [topics] dlq_max_value_bytes, a record as large as
    the largest fetch).
    """
    k, b = settings.kafka, settings.batching
    # Fetch what the in-flight batches need, within the operator's upper bound.
    fetch = min(k.fetch_max_bytes, max(LIBRDKAFKA_MESSAGE_MAX_BYTES,
                                       b.max_inflight_batches * b.max_batch_size * EVENT_FETCH_BYTES))
    partition_fetch = min(fetch, max(MIN_PARTITION_FETCH_BYTES, PREFETCH_BATCHES * b.max_batch_size * EVENT_FETCH_BYTES))
    # Outputs are as large as inputs; a dead letter carries its input's value (cut to the limit).
    message_max = max(LIBRDKAFKA_MESSAGE_MAX_BYTES, k.fetch_max_bytes,
                      settings.topics.dlq_max_value_bytes + DLQ_HEADERS_ALLOWANCE)
    return BufferSizes(
        fetch_max_bytes=fetch,
        partition_fetch_bytes=partition_fetch,
        prefetch_messages=PREFETCH_BATCHES * b.max_batch_size,
        prefetch_kbytes=k.queued_max_messages_kbytes,
        producer_queue_messages=max(PRODUCER_BATCH_MESSAGES, PRODUCER_QUEUE_BATCHES * b.max_batch_size),
        # the prefetch budget again (outputs mirror inputs), and never less than one largest record
        producer_queue_kbytes=max(k.queued_max_messages_kbytes, -(-message_max // 1024)),
        message_max_bytes=message_max,
    )


def common(settings: Settings) -> dict[str, Any]:
    """Settings every librdkafka client of the worker shares (consumer, producer, admin)."""
    conf: dict[str, Any] = dict(settings.kafka.client)
    conf["bootstrap.servers"] = settings.kafka.bootstrap_servers
    conf.setdefault("client.id", f"sluice-{settings.kafka.replica_id}")
    # librdkafka's log lines go through the worker's structured logger (JSON, client name,
    # repeats rate-limited) instead of raw %3|...| lines on stderr.
    conf["logger"] = kafka_logger()
    return conf


def consumer_config(settings: Settings) -> dict[str, Any]:
    """The transactional worker's consumer: read_committed, no auto commit, static membership."""
    k = settings.kafka
    sizes = buffer_sizes(settings)
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
            # Bound prefetch so memory is a function of configuration, not of lag (buffer_sizes).
            "fetch.max.bytes": sizes.fetch_max_bytes,
            "max.partition.fetch.bytes": sizes.partition_fetch_bytes,
            "queued.min.messages": sizes.prefetch_messages,
            "queued.max.messages.kbytes": sizes.prefetch_kbytes,
            # A consumer's fetch.max.bytes may not be below its message.max.bytes (a request
            # size limit that matters only to producers): never refuse a small fetch bound.
            "message.max.bytes": min(LIBRDKAFKA_MESSAGE_MAX_BYTES, sizes.fetch_max_bytes),
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
    """The worker's transactional producer (transactional.id derived from the replica id)."""
    k = settings.kafka
    sizes = buffer_sizes(settings)
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
            "batch.num.messages": PRODUCER_BATCH_MESSAGES,
            # Bound the producer queue from the settings (buffer_sizes); a full queue raises
            # BufferError and the worker serves delivery reports and retries, never drops.
            "queue.buffering.max.messages": sizes.producer_queue_messages,
            "queue.buffering.max.kbytes": sizes.producer_queue_kbytes,
            # Outputs are as large as inputs; dead letters carry the original value.
            "message.max.bytes": sizes.message_max_bytes,
            "compression.type": "lz4",
        }
    )
    return conf


def admin_config(settings: Settings) -> dict[str, Any]:
    """The admin client's settings: the shared ones only."""
    return common(settings)


# ------------------------------------------------------------- faust / aiokafka (drift aggregator)

# The [kafka] client settings the drift aggregator's clients (faust and aiokafka, not librdkafka)
# can honour. Any other security setting fails its start: connecting without a setting the
# operator asked for (a CA, a mechanism) could mean connecting with less security than meant.
AIOKAFKA_SECURITY_KEYS = (
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
    "ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
)
_SECURITY_PREFIXES = ("security.", "sasl.", "ssl.")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class AioSecurity:
    """``[kafka] client``'s security settings, in the terms of aiokafka and faust."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    ssl_context: ssl.SSLContext | None = None
    ignored: tuple[str, ...] = ()  # non-security librdkafka settings these clients do not have

    def producer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``aiokafka.AIOKafkaProducer``."""
        kw: dict[str, Any] = {"security_protocol": self.protocol}
        if self.ssl_context is not None:
            kw["ssl_context"] = self.ssl_context
        if self.mechanism is not None:
            kw.update(sasl_mechanism=self.mechanism, sasl_plain_username=self.username,
                      sasl_plain_password=self.password)
        return kw

    def faust_credentials(self) -> Any:
        """``broker_credentials`` for ``faust.App`` (None for PLAINTEXT)."""
        import faust

        if self.mechanism is not None:
            return faust.SASLCredentials(username=self.username, password=self.password,
                                         ssl_context=self.ssl_context, mechanism=self.mechanism)
        if self.ssl_context is not None:
            return faust.SSLCredentials(self.ssl_context)
        return None


def aiokafka_security(settings: Settings) -> AioSecurity:
    """Translate ``[kafka] client`` for the drift aggregator; ConfigError names what it cannot honour."""
    client = dict(settings.kafka.client)
    unsupported = sorted(k for k in client if k.startswith(_SECURITY_PREFIXES) and k not in AIOKAFKA_SECURITY_KEYS)
    if unsupported:
        raise ConfigError(
            f"[kafka] client: {', '.join(unsupported)} not supported by the drift aggregator (faust/aiokafka); "
            f"it supports {', '.join(AIOKAFKA_SECURITY_KEYS)}"
        )
    protocol = str(client.get("security.protocol", "PLAINTEXT")).upper()
    if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ConfigError(f"[kafka] client: security.protocol = {protocol!r} is not a Kafka security protocol")
    mechanism = None
    username = password = None
    if protocol.startswith("SASL_"):
        mechanism = str(client.get("sasl.mechanism", client.get("sasl.mechanisms", "GSSAPI"))).upper()
        if mechanism not in _SASL_MECHANISMS:
            raise ConfigError(f"[kafka] client: sasl.mechanism = {mechanism!r} is not supported by the drift "
                              f"aggregator; it supports {', '.join(_SASL_MECHANISMS)}")
        username, password = client.get("sasl.username"), client.get("sasl.password")
        if not username or not password:
            raise ConfigError(f"[kafka] client: sasl.mechanism {mechanism} needs sasl.username and sasl.password")
        username, password = str(username), str(password)
    context = None
    if protocol.endswith("SSL"):
        try:
            context = ssl.create_default_context(cafile=client.get("ssl.ca.location"))
            cert = client.get("ssl.certificate.location")
            if cert:
                context.load_cert_chain(cert, client.get("ssl.key.location"), client.get("ssl.key.password"))
        except (OSError, ssl.SSLError) as exc:  # a missing file, a key that does not match, ...
            raise ConfigError(f"[kafka] client: cannot build the TLS context from ssl.*: {exc}") from None
        # librdkafka verifies the broker's host name unless this is "none"; so does this context.
        if str(client.get("ssl.endpoint.identification.algorithm", "https")).lower() == "none":
            context.check_hostname = False
    ignored = tuple(sorted(k for k in client if not k.startswith(_SECURITY_PREFIXES) and k != "client.id"))
    return AioSecurity(protocol, mechanism, username, password, context, ignored)
