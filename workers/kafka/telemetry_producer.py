"""Publishing synthetic telemetry to a topic (``sluice produce``, the demo, tests, bench)."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Producer

from workers import telemetry
from workers.logs import kafka_logger

# Flush at the end waits for every acknowledgement; a broker that stops
# answering for this long fails the command instead of hanging it.
FINAL_FLUSH_TIMEOUT_S = 120.0


class ProduceFailed(RuntimeError):
    """Some records were not acknowledged (the message says how many and the first error)."""


def produce_telemetry(
    bootstrap: str,
    topic: str,
    kind: str = "flow",
    count: int = 1000,
    rate: float | None = None,
    seed: int = 0,
    bad_fraction: float = 0.0,
    client: dict[str, Any] | None = None,
    stop: Any = None,
    **generate_kwargs: Any,
) -> int:
    """Produce ``count`` events (at ``rate`` events/s if given); return how many were acknowledged.

    Raises ProduceFailed if any record was not acknowledged. ``stop`` is an
    optional threading.Event that ends production early.
    """
    conf = dict(client or {})
    conf.update(
        {
            "bootstrap.servers": bootstrap,
            # No duplicates or reordering from producer retries: tests count exact deliveries.
            "enable.idempotence": True,
            "linger.ms": 5,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 500_000,
            "compression.type": "lz4",
            # librdkafka's lines through the structured logger, repeats rate-limited.
            "logger": kafka_logger(),
        }
    )
    producer = Producer(conf)
    failures: list[str] = []
    acked = 0

    def on_delivery(err, msg):
        nonlocal acked
        if err is None:
            acked += 1
        else:
            failures.append(err.str())

    start = time.monotonic()
    sent = 0
    events = telemetry.generate(
        kind=kind, count=count, seed=seed, bad_fraction=bad_fraction,
        start_ts=time.time() if rate else None, rate=rate, **generate_kwargs
    )
    for key, value, headers in events:
        if stop is not None and stop.is_set():
            break
        while True:
            try:
                producer.produce(topic, value, key, headers=headers or None, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        sent += 1
        if rate:
            # poll() returns at the first delivery report, so wait in a loop until this event's
            # time: at low rates one poll per event ran about 3x too fast (50/s came out ~150/s)
            # and event timestamps ran ahead of the clock.
            while (ahead := sent / rate - (time.monotonic() - start)) > 0.002:
                producer.poll(ahead)
        elif sent % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(FINAL_FLUSH_TIMEOUT_S)
    if left or failures:
        raise ProduceFailed(
            f"{sent - acked} of {sent} records not acknowledged"
            + (f"; first error: {failures[0]}" if failures else f"; {left} still queued")
        )
    return acked
