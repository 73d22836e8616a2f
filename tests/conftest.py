"""Broker fixtures shared by every test.

SLUICE_TEST_BROKER selects the broker:
  devbroker (default)  a private devbroker subprocess on a temp data dir
  kafka                Apache Kafka (KRaft, 1 node) started by `scripts/kafka` on a temp data dir
  testcontainers       apache/kafka via testcontainers' KafkaContainer (skipped without Docker)
  external             an existing cluster at SLUICE_TEST_BOOTSTRAP

Fixtures: `broker` (session; .bootstrap, .kind and, for devbroker and kafka,
.kill/.stop/.start/.restart/.data_dir), `bootstrap`, `new_topic(partitions=1, prefix="t")`,
`fresh_broker` (function scope: a broker of the session's kind of its own, devbroker or kafka),
`kafka_cluster` (function scope: a 3-node Apache Kafka, whatever the session's broker).
Tests marked `devbroker_only` exercise devbroker's internals and are skipped on other brokers.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BROKER_KIND = os.environ.get("SLUICE_TEST_BROKER", "devbroker").strip().lower() or "devbroker"


class _ExternalBroker:
    def __init__(self, bootstrap: str, kind: str):
        self.bootstrap = bootstrap
        self.kind = kind


class _DevBrokerHandle:
    """The session's devbroker, with the control methods tests may use."""

    kind = "devbroker"

    def __init__(self, db):
        self._db = db

    @property
    def bootstrap(self) -> str:
        return self._db.bootstrap

    @property
    def data_dir(self) -> str:
        return self._db.data_dir

    @property
    def pid(self):
        return self._db.pid

    def kill(self) -> None:
        self._db.kill()

    def stop(self) -> None:
        self._db.stop()

    def start(self):
        self._db.start()
        return self

    def restart(self, kill: bool = False):
        self._db.restart(kill=kill)
        return self


def pytest_collection_modifyitems(config, items):
    skip_dev = pytest.mark.skip(reason=f"needs devbroker (SLUICE_TEST_BROKER={BROKER_KIND})")
    skip_kafka = pytest.mark.skip(reason="runs in the Apache Kafka pass (SLUICE_TEST_BROKER=kafka)")
    for item in items:
        if "devbroker_only" in item.keywords and BROKER_KIND != "devbroker":
            item.add_marker(skip_dev)
        if "kafka_only" in item.keywords and BROKER_KIND != "kafka":
            item.add_marker(skip_kafka)


def _start_testcontainers():
    try:
        from testcontainers.kafka import KafkaContainer
    except ImportError as e:
        pytest.skip(f"testcontainers[kafka] is not installed: {e}")
    try:
        import docker

        docker.from_env().ping()
    except Exception as e:  # noqa: BLE001 - any failure means no usable Docker
        pytest.skip(f"Docker is not available for testcontainers: {e}")
    image = os.environ.get("SLUICE_TEST_KAFKA_IMAGE", "apache/kafka:3.9.0")
    container = KafkaContainer(image)
    try:
        container = container.with_kraft()
    except Exception:  # noqa: BLE001 - older testcontainers
        pass
    container.start()
    return container


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    if BROKER_KIND == "devbroker":
        from devbroker import DevBroker

        db = DevBroker(data_dir=str(tmp_path_factory.mktemp("devbroker")), partitions=1)
        db.start()
        try:
            yield _DevBrokerHandle(db)
        finally:
            db.close()
    elif BROKER_KIND == "kafka":
        from workers.kafka.apache import ApacheKafka

        cluster = ApacheKafka(str(tmp_path_factory.mktemp("kafka")), brokers=1).start()
        try:
            yield cluster
        finally:
            cluster.close()
    elif BROKER_KIND == "testcontainers":
        container = _start_testcontainers()
        try:
            yield _ExternalBroker(container.get_bootstrap_server(), "testcontainers")
        finally:
            container.stop()
    elif BROKER_KIND == "external":
        bootstrap = os.environ.get("SLUICE_TEST_BOOTSTRAP")
        if not bootstrap:
            pytest.skip("SLUICE_TEST_BROKER=external needs SLUICE_TEST_BOOTSTRAP")
        yield _ExternalBroker(bootstrap, "external")
    else:
        raise pytest.UsageError(f"unknown SLUICE_TEST_BROKER={BROKER_KIND!r} "
                                "(devbroker | kafka | testcontainers | external)")


@pytest.fixture
def bootstrap(broker) -> str:
    return broker.bootstrap


def create_topic(bootstrap: str, name: str, partitions: int = 1, timeout: float = 30.0,
                 config: dict[str, str] | None = None) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=-1,
                                            config=config or {})], operation_timeout=timeout)
    futures[name].result(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = admin.list_topics(topic=name, timeout=5)
        t = md.topics.get(name)
        if t is not None and t.error is None and len(t.partitions) == partitions:
            return name
        time.sleep(0.05)
    raise TimeoutError(f"topic {name} did not appear in metadata")


@pytest.fixture
def new_topic(bootstrap):
    def make(partitions: int = 1, prefix: str = "t", config: dict[str, str] | None = None) -> str:
        return create_topic(bootstrap, f"{prefix}-{uuid.uuid4().hex[:10]}", partitions, config=config)

    return make


@pytest.fixture
def fresh_broker(tmp_path):
    if BROKER_KIND == "kafka":
        from workers.kafka.apache import ApacheKafka

        cluster = ApacheKafka(str(tmp_path / "kafka-data"), brokers=1).start()
        try:
            yield cluster
        finally:
            cluster.close()
        return
    if BROKER_KIND != "devbroker":
        pytest.skip(f"fresh_broker needs devbroker or kafka (SLUICE_TEST_BROKER={BROKER_KIND})")
    from devbroker import DevBroker

    db = DevBroker(data_dir=str(tmp_path / "devbroker-data"), partitions=1)
    db.start()
    try:
        yield _DevBrokerHandle(db)
    finally:
        db.close()


@pytest.fixture
def kafka_cluster(tmp_path):
    """A 3-node Apache Kafka (replication factor 3, min.insync.replicas 2) for this test alone."""
    from workers.kafka.apache import ApacheKafka

    cluster = ApacheKafka(str(tmp_path / "kafka-cluster"), brokers=3).start()
    try:
        yield cluster
    finally:
        cluster.close()
