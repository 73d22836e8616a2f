"""SLUICE_TEST_FAULTS, the test-only fault plan of the producer wrapper: parsing, counting, and
a produce fault raising the wrapper's own AbortableError through librdkafka's error type.
(The worker's reaction to each fault, against a broker: tests/integration/test_worker_faults.py.)"""

from __future__ import annotations

import pytest

from workers.exit_codes import ConfigError
from workers.kafka.producer import FAULTS_ENV, AbortableError, FaultPlan, TransactionalProducer, process_faults


def test_a_plan_fires_each_fault_once_at_its_count():
    plan = FaultPlan("produce:abortable@3, commit:abortable@2,commit:indefinite@4")
    assert [plan.next("produce") for _ in range(5)] == [None, None, "abortable", None, None]
    assert [plan.next("commit") for _ in range(5)] == [None, "abortable", None, "indefinite", None]
    assert plan.has("commit") and not plan.has("abort") and plan.count("produce") == 5


@pytest.mark.parametrize("spec", ["produce:indefinite@1", "commit:abortable", "commit:abortable@0", "init:abortable@1",
                                  "commit:abortable@x"])
def test_a_plan_that_cannot_be_read_fails_naming_the_variable_and_the_format(spec):
    with pytest.raises(ConfigError) as e:
        FaultPlan(spec)
    assert str(e.value).startswith(f"{FAULTS_ENV}: cannot read") and "commit:indefinite@N" in str(e.value)


def test_the_process_plan_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    assert process_faults() is None
    monkeypatch.setenv(FAULTS_ENV, "commit:abortable@7")
    plan = process_faults()
    assert plan is process_faults()  # one plan (and one count) per process
    assert plan.has("commit")


def test_an_injected_produce_fault_is_the_wrappers_abortable_error_until_the_transaction_aborts():
    producer = TransactionalProducer({"bootstrap.servers": "127.0.0.1:1", "transactional.id": "faults-unit"},
                                     faults=FaultPlan("produce:abortable@1"))
    try:
        for _ in range(2):  # librdkafka's abortable state: every later produce fails the same way
            with pytest.raises(AbortableError, match="produce #1 failed, injected by SLUICE_TEST_FAULTS"):
                producer.produce("t", b"v")
    finally:
        producer.close()


def test_without_a_plan_the_hot_path_is_librdkafkas_own_produce(monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    producer = TransactionalProducer({"bootstrap.servers": "127.0.0.1:1", "transactional.id": "faults-none"})
    try:
        assert producer.produce_call == producer._producer.produce
    finally:
        producer.close()
