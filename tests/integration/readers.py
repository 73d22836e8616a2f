"""Reading a topic back in tests, at a chosen isolation level."""

import time
import uuid

import orjson
from confluent_kafka import Consumer, TopicPartition


def read_values(bootstrap: str, topic: str, isolation: str, expect: int, partitions: int = 1,
                timeout: float = 10.0) -> list[bytes]:
    """The values in partitions 0..`partitions`-1 of `topic` at `isolation`: once at least
    `expect` have come (or at `timeout`), everything up to each partition's end as it is then
    (its high watermark; under read_committed its last stable offset): an exact end, so one
    record too many shows, with no "nothing came for a while" guess."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "isolation.level": isolation,
                  "auto.offset.reset": "earliest"})
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[bytes] = []
    ends: dict[int, tuple[int, int]] | None = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if ends is None and len(out) >= expect:
                ends = {tp.partition: c.get_watermark_offsets(tp, timeout=5, cached=False) for tp in tps}
            if ends is not None and all(ends[tp.partition][1] <= ends[tp.partition][0]
                                        or tp.offset >= ends[tp.partition][1] for tp in c.position(tps)):
                break
            m = c.poll(0.1)
            if m is not None and not m.error():
                out.append(m.value())
    finally:
        c.close()
    return out


def read_to_end(bootstrap: str, topic: str, partitions: int | None = None, timeout: float = 10.0) -> dict[int, list]:
    """Every committed record (read_committed) of each partition up to its high watermark, as
    it is at the call: an exact end, not "nothing came for a while". librdkafka's position moves
    past transaction markers and aborted records, so it reaches the high watermark.
    ``partitions``: how many (default: the topic's, from the metadata)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "isolation.level": "read_committed"})
    out: dict[int, list] = {}
    try:
        if partitions is None:
            partitions = len(c.list_topics(topic, timeout=timeout).topics[topic].partitions)
        for p in range(partitions):
            tp = TopicPartition(topic, p)
            low, high = c.get_watermark_offsets(tp, timeout=timeout)
            out[p] = []
            if high <= low:
                continue
            c.assign([TopicPartition(topic, p, low)])
            deadline = time.monotonic() + timeout
            while c.position([tp])[0].offset < high:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{topic}[{p}] not read to its end ({high}) within {timeout}s")
                m = c.poll(0.2)
                if m is not None and m.error() is None:
                    out[p].append(m)
    finally:
        c.close()
    return out


def committed_for(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The committed offsets of `group` on `topic` (negative: none)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in tps}


def drift_aggregator_settled(bootstrap: str, group: str, source: str, partitions: int | None = None) -> bool:
    """True once the drift aggregator of `group` can publish nothing more from what is in
    `source`: its committed offsets cover every committed delta, and its committed state (the
    meta table's changelog) holds no open window. faust commits reports, table changes and
    source offsets in one transaction, so every report it will ever publish from these deltas
    is then readable: nothing extra can arrive later."""
    deltas = read_to_end(bootstrap, source, partitions)
    partitions = len(deltas)
    committed = committed_for(bootstrap, group, source, partitions)
    for p, msgs in deltas.items():
        if msgs and committed.get(p, -1) <= msgs[-1].offset():
            return False
    latest: dict[bytes, bytes | None] = {}
    for msgs in read_to_end(bootstrap, f"{group}-drift-meta-changelog", partitions).values():
        latest.update((m.key(), m.value()) for m in msgs)
    return bool(latest) and all(v is None or not orjson.loads(v)["open"] for v in latest.values())
