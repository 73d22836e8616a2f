#!/usr/bin/env python
"""Throughput of devbroker with confluent-kafka: a batching producer (linger.ms>=5)
and a consumer, records of ~200 bytes. Prints records/s and the broker process's
CPU seconds per 100k records (utime+stime from /proc/<pid>/stat).

    python scripts/bench_devbroker.py [--records 500000] [--size 200] [--partitions 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from devbroker import DevBroker  # noqa: E402


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--linger-ms", type=int, default=5)
    args = ap.parse_args()
    n = args.records
    payload = os.urandom(args.size // 2).hex().encode()[: args.size]
    with DevBroker(partitions=args.partitions) as b:
        topic = "bench"
        p = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": args.linger_ms,
                      "batch.size": 1_000_000, "queue.buffering.max.messages": 1_000_000,
                      "queue.buffering.max.kbytes": 1_048_576, "enable.idempotence": True,
                      "compression.type": "none"})
        p.produce(topic, b"warmup")
        p.flush(30)
        cpu0 = cpu_seconds(b.pid)
        t0 = time.perf_counter()
        for i in range(n):
            while True:
                try:
                    p.produce(topic, payload)
                    break
                except BufferError:
                    p.poll(0.001)
        p.flush(120)
        dt = time.perf_counter() - t0
        cpu1 = cpu_seconds(b.pid)
        print(f"produce: {n / dt:,.0f} records/s ({n} x {args.size} B in {dt:.2f}s), "
              f"broker CPU {100_000 * (cpu1 - cpu0) / n:.3f} s per 100k records")

        c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": "bench", "enable.auto.commit": False,
                      "fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 10_485_760,
                      "queued.max.messages.kbytes": 262_144,
                      # librdkafka pauses fetching for fetch.queue.backoff.ms (default 1 s) once its
                      # local queue passes queued.min.messages: a client-side stall that made this
                      # measurement bimodal (~0.2M vs ~1M records/s) without the broker's doing
                      "fetch.queue.backoff.ms": 10})
        c.assign([TopicPartition(topic, i, 1 if i == 0 else 0) for i in range(args.partitions)])
        got = 0
        cpu0 = cpu_seconds(b.pid)
        t0 = time.perf_counter()
        deadline = t0 + 120
        while got < n and time.perf_counter() < deadline:
            for m in c.consume(10_000, 1.0):
                if not m.error():
                    got += 1
        dt = time.perf_counter() - t0
        cpu1 = cpu_seconds(b.pid)
        c.close()
        print(f"consume: {got / dt:,.0f} records/s ({got} in {dt:.2f}s), "
              f"broker CPU {100_000 * (cpu1 - cpu0) / max(got, 1):.3f} s per 100k records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
