"""devbroker restarts (SIGTERM and SIGKILL) keep records, committed offsets,
producer and transaction state; plus the CLI start contract."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from .readers import read_values


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# A coordinator that is loading its __consumer_offsets / __transaction_state partition (on a
# fresh Kafka, and after every Kafka restart until the partition is read back), or that the
# client has not found again yet, answers with these; librdkafka hands some of them to the
# application, which retries. devbroker is ready when it listens, so it never sends them.
COORDINATOR_NOT_READY = {KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.NOT_COORDINATOR,
                         KafkaError.COORDINATOR_NOT_AVAILABLE}


def retrying(call, timeout: float = 30.0):
    """call() again while it fails with a retriable error or a coordinator not ready yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaException as e:
            err = e.args[0]
            if err.fatal() or time.monotonic() >= deadline or not (
                    err.retriable() or err.code() in COORDINATOR_NOT_READY):
                raise
            time.sleep(0.2)


def _committed(bootstrap, group, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return retrying(lambda: c.committed([TopicPartition(topic, 0)], timeout=10))[0].offset
    finally:
        c.close()


def _commit(bootstrap, group, topic, offset):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        retrying(lambda: c.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False))
    finally:
        c.close()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_preserves_records_offsets_and_open_transactions(fresh_broker, how):
    b = fresh_broker
    topic, group = "restart-topic", "restart-group"
    p = Producer({"bootstrap.servers": b.bootstrap, "enable.idempotence": True, "linger.ms": 1})
    for i in range(100):
        p.produce(topic, b"r%d" % i)
    assert p.flush(10) == 0
    _commit(b.bootstrap, group, topic, 42)
    tp = Producer({"bootstrap.servers": b.bootstrap, "transactional.id": f"tx-{how}", "linger.ms": 1})
    tp.init_transactions(10)
    tp.begin_transaction()
    tp.produce(topic, b"pending")
    tp.flush(10)

    old = b.bootstrap
    b.restart(kill=(how == "sigkill"))
    assert b.bootstrap == old, "restart keeps the port so clients reconnect"

    assert _committed(b.bootstrap, group, topic) == 42
    assert len(read_values(b.bootstrap, topic, "read_committed", 100)) == 100
    assert len(read_values(b.bootstrap, topic, "read_uncommitted", 101)) == 101
    # the open transaction survived: the same producer commits it after reconnecting (a
    # retriable failure, such as a coordinator still loading, leaves it to be committed again)
    retrying(lambda: tp.commit_transaction(20), timeout=60)
    got = read_values(b.bootstrap, topic, "read_committed", 101)
    assert len(got) == 101 and got[-1] == b"pending"
    # the idempotent producer goes on without duplicates
    p.produce(topic, b"after")
    assert p.flush(10) == 0
    assert len(read_values(b.bootstrap, topic, "read_uncommitted", 102)) == 102


def test_new_producer_after_restart_fences_transaction_left_open(fresh_broker):
    b = fresh_broker
    topic = "fence-after-restart"
    tp = Producer({"bootstrap.servers": b.bootstrap, "transactional.id": "tx-open", "linger.ms": 1})
    tp.init_transactions(10)
    tp.begin_transaction()
    tp.produce(topic, b"left-open")
    tp.flush(10)
    b.restart(kill=True)
    fresh = Producer({"bootstrap.servers": b.bootstrap, "transactional.id": "tx-open"})
    fresh.init_transactions(15)
    fresh.begin_transaction()
    fresh.produce(topic, b"new")
    fresh.commit_transaction(10)
    assert read_values(b.bootstrap, topic, "read_committed", 1) == [b"new"]


@pytest.mark.devbroker_only  # writes into devbroker's own segment files
def test_torn_tail_after_sigkill_is_truncated(fresh_broker):
    b = fresh_broker
    topic = "torn"
    p = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 1})
    for i in range(10):
        p.produce(topic, b"%d" % i)
    p.flush(10)
    b.kill()
    path = os.path.join(b.data_dir, "logs", f"{topic}-0", "00000000000000000000.log")
    with open(path, "ab") as f:
        f.write(b"\x00" * 8 + b"\x00\x00\x01\x00" + b"partial")
    b.start()
    p2 = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 1})
    p2.produce(topic, b"10")
    p2.flush(10)
    assert read_values(b.bootstrap, topic, "read_uncommitted", 11) == [b"%d" % i for i in range(11)]


def _run_cli(*args, timeout=30):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "devbroker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.devbroker_only  # devbroker's own command line
def test_cli_contract(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    help_text = subprocess.run([sys.executable, "-m", "devbroker", "--help"], capture_output=True,
                               text=True, env=env, check=True).stdout
    assert "not for production" in help_text.lower()
    refused = subprocess.run([sys.executable, "-m", "devbroker", "--host", "0.0.0.0", "--port", "0",
                              "--data-dir", str(tmp_path / "r")], capture_output=True, text=True, env=env,
                             timeout=30)
    assert refused.returncode != 0 and "allow-remote" in refused.stderr
    proc = _run_cli("--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path / "d"),
                    "--partitions", "3")
    line = proc.stdout.readline().strip()
    assert line.startswith("bootstrap.servers=127.0.0.1:")
    bootstrap = line.split("=", 1)[1]
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic=f"auto-{uuid.uuid4().hex[:6]}",
                                                                   timeout=10)
    assert [len(t.partitions) for t in md.topics.values()] == [3]  # auto-created with --partitions
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_deleted_topic_recreated_has_no_old_records_or_committed_offsets(fresh_broker):
    """Kafka drops a deleted topic's committed offsets with its partitions: a group must not
    resume a re-created topic of the same name at the old offsets, neither before nor after
    a restart (journal replay)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    b = fresh_broker
    topic, group = "recreated", "recreated-group"
    a = AdminClient({"bootstrap.servers": b.bootstrap})
    for f in a.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result()
    p = Producer({"bootstrap.servers": b.bootstrap})
    for i in range(5):
        p.produce(topic, b"old%d" % i)
    assert p.flush(10) == 0
    _commit(b.bootstrap, group, topic, 4)
    assert _committed(b.bootstrap, group, topic) == 4
    for f in a.delete_topics([topic]).values():
        f.result()
    for f in a.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result()
    assert _committed(b.bootstrap, group, topic) < 0
    b.restart(kill=True)
    assert _committed(b.bootstrap, group, topic) < 0
    assert read_values(b.bootstrap, topic, "read_uncommitted", 0) == []


def test_group_membership_survives_restart_without_rebalance(fresh_broker):
    """Kafka keeps group metadata (generation, members, assignment) in __consumer_offsets and
    reloads it when the coordinator starts, giving each member a fresh session: a consumer
    keeps its member id and assignment across a broker SIGKILL + restart (no revoke/assign,
    no lost) and its commits with the pre-restart generation are accepted, provided its
    session outlasts the restart. Kafka takes seconds to restart (a JVM, log recovery, the
    coordinator loading its partition): with the 6 s session of the other tests librdkafka's
    own session timer expires meanwhile and it declares its assignment lost, as it must."""
    b = fresh_broker
    topic, group = "member-restart", "member-restart-group"
    p = Producer({"bootstrap.servers": b.bootstrap})
    for i in range(4):
        p.produce(topic, b"m%d" % i)
    assert p.flush(10) == 0
    events: list[str] = []
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": group, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "session.timeout.ms": 60000,
                  "heartbeat.interval.ms": 200})
    c.subscribe([topic], on_assign=lambda *_: events.append("assign"),
                on_revoke=lambda *_: events.append("revoke"), on_lost=lambda *_: events.append("lost"))
    got = []
    deadline = time.monotonic() + 15
    while len(got) < 2 and time.monotonic() < deadline:
        m = c.poll(0.2)
        if m is not None and not m.error():
            got.append(m)
    assert len(got) == 2 and events == ["assign"]
    c.commit(got[-1], asynchronous=False)
    restart_began = time.monotonic()
    b.restart(kill=True)
    restart_s = time.monotonic() - restart_began
    assert restart_s < 45, "the restart outlasted the consumer's session"
    if b.kind == "devbroker":  # a deliberate difference: devbroker/README.md
        assert restart_s < 6, "devbroker restarts within even the shortest session timeout"
    deadline = time.monotonic() + 30
    while len(got) < 4 and time.monotonic() < deadline:
        m = c.poll(0.2)
        if m is not None and not m.error():
            got.append(m)
    assert [m.value() for m in got] == [b"m0", b"m1", b"m2", b"m3"]
    # raises on UNKNOWN_MEMBER_ID / ILLEGAL_GENERATION (retries only a coordinator still loading)
    retrying(lambda: c.commit(got[-1], asynchronous=False))
    end = time.monotonic() + 1.5  # a few heartbeats after the restart
    while time.monotonic() < end:
        c.poll(0.1)
    assert events == ["assign"], events
    c.close()
    assert _committed(b.bootstrap, group, topic) == 4
