"""Reading a topic back in tests, at a chosen isolation level."""

import time
import uuid

from confluent_kafka import Consumer, TopicPartition


def read_values(bootstrap: str, topic: str, isolation: str, expect: int, partitions: int = 1,
                timeout: float = 10.0, idle: float = 1.0) -> list[bytes]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "isolation.level": isolation,
                  "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while time.monotonic() < deadline:
        m = c.poll(0.1)
        if m is None:
            if len(out) >= expect and time.monotonic() - last > idle:
                break
            continue
        if m.error():
            continue
        out.append(m.value())
        last = time.monotonic()
    c.close()
    return out
