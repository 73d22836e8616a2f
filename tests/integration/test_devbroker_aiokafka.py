"""aiokafka (the client faust-streaming uses) against the test broker: produce,
consume in a group with committed offsets, and transactions."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition


async def _consume(bootstrap, topic, n, **kw):
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", **kw)
    await c.start()
    out = []
    try:
        while len(out) < n:
            batch = await asyncio.wait_for(c.getmany(timeout_ms=200), 15)
            for msgs in batch.values():
                out.extend(m.value for m in msgs)
            if not batch and n == 0:
                break
        return out, c
    except BaseException:
        await c.stop()
        raise


def test_aiokafka_produce_and_group_consume_with_commit(bootstrap, new_topic):
    t = new_topic(partitions=2)
    group = f"g-aio-{uuid.uuid4().hex[:8]}"

    async def run():
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5)
        await p.start()
        try:
            for i in range(200):
                await p.send(t, b"m%d" % i, partition=i % 2)
            await p.flush()
        finally:
            await p.stop()
        out, c = await _consume(bootstrap, t, 200, group_id=group, enable_auto_commit=False,
                                session_timeout_ms=6000, heartbeat_interval_ms=200)
        try:
            assert sorted(out) == sorted(b"m%d" % i for i in range(200))
            await c.commit()
            committed = {p: await c.committed(TopicPartition(t, p)) for p in range(2)}
            assert committed == {0: 100, 1: 100}
        finally:
            await c.stop()

    asyncio.run(run())


def test_aiokafka_transactions_commit_and_abort(bootstrap, new_topic):
    t = new_topic()

    async def run():
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"aio-{t}")
        await p.start()
        try:
            async with p.transaction():
                await p.send_and_wait(t, b"committed")
            await p.begin_transaction()
            await p.send_and_wait(t, b"aborted")
            await p.abort_transaction()
        finally:
            await p.stop()
        rc, c1 = await _consume(bootstrap, t, 1, isolation_level="read_committed")
        await asyncio.sleep(0.5)
        rc += [m.value for msgs in (await c1.getmany(timeout_ms=500)).values() for m in msgs]
        await c1.stop()
        ru, c2 = await _consume(bootstrap, t, 2, isolation_level="read_uncommitted")
        await c2.stop()
        assert rc == [b"committed"]
        assert sorted(ru) == [b"aborted", b"committed"]

    asyncio.run(run())
