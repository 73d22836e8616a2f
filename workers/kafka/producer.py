"""The transactional producer: one per process, one open transaction at a time.

Guarantee: records produced between :meth:`TransactionalProducer.begin` and a
successful :meth:`commit` become visible to ``read_committed`` readers
atomically with the consumer offsets sent in that commit; after :meth:`abort`
none of them ever do. Limits: a transaction must commit within
``transaction.timeout.ms`` or the broker aborts it, and a producer fenced by a
newer instance of the same ``transactional.id`` can only exit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

# init_transactions waits for the broker to abort a previous incarnation's
# transaction; that can take a transaction round trip or a coordinator move.
INIT_TIMEOUT_S = 60.0
# One commit or abort; longer means the cluster is unhealthy and the worker
# should rewind (abort) rather than hold the orchestrator thread.
COMMIT_TIMEOUT_S = 30.0
# How long produce() serves delivery reports while the local queue is full before
# it gives up (abort, rewind); well below max.poll.interval.ms, since the consumer
# is not polled meanwhile.
QUEUE_FULL_TIMEOUT_S = 10.0
# Between retries of a failed abort (e.g. a commit still in flight in librdkafka).
ABORT_RETRY_BACKOFF_S = 0.1


class FatalProducerError(RuntimeError):
    """The producer cannot go on (fenced, unknown producer id, ...): the process must exit."""


class AbortableError(RuntimeError):
    """The current transaction failed and was (or must be) aborted; rewind and go on."""


class RetriableError(RuntimeError):
    """The operation may be retried as is."""


def as_producer_error(exc: KafkaException, during: str) -> Exception:
    """The worker's error for a librdkafka error raised by a producer call."""
    kind = classify(exc)
    if kind is FatalProducerError:
        return FatalProducerError(f"{during} failed fatally: {exc.args[0].str()}")
    return AbortableError(f"{during} failed: {exc.args[0].str()}")


def classify(exc: KafkaException) -> type[Exception]:
    err: KafkaError = exc.args[0]
    if err.fatal():
        return FatalProducerError
    if err.txn_requires_abort():
        return AbortableError
    if err.retriable():
        return RetriableError
    return AbortableError


class TransactionalProducer:
    """Wraps a transactional confluent-kafka Producer with the worker's error handling."""

    def __init__(self, conf: dict[str, Any]):
        self._producer = Producer(conf)
        self.in_transaction = False
        # Set once a fatal error was seen: every later transactional call fails at once instead
        # of waiting on a producer librdkafka has already given up (e.g. from a revoke callback
        # while the process closes after being fenced).
        self.failed: str | None = None
        self.produce_call = self._producer.produce  # bound once: the hot path calls it per record

    def _error(self, exc: KafkaException, during: str) -> Exception:
        err = as_producer_error(exc, during)
        if isinstance(err, FatalProducerError):
            self.failed = str(err)
        return err

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise FatalProducerError(f"producer unusable after a fatal error: {self.failed}")

    def init(self, timeout: float = INIT_TIMEOUT_S) -> None:
        try:
            self._producer.init_transactions(timeout)
        except KafkaException as exc:
            # The client's log lines (why it failed) are delivered by poll(): serve them first.
            self._producer.poll(0)
            raise FatalProducerError(f"init_transactions failed: {exc.args[0].str()}") from exc

    def begin(self) -> None:
        self._check_usable()
        if not self.in_transaction:
            try:
                self._producer.begin_transaction()
            except KafkaException as exc:
                raise self._error(exc, "begin_transaction") from exc
            self.in_transaction = True

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None, headers: Any = None) -> None:
        """Produce one record; on a full local queue serve it and retry, never drop.

        Raises FatalProducerError (e.g. fenced) or AbortableError (the transaction failed).
        """
        try:
            self.produce_call(topic, value, key, headers=headers)
            return
        except BufferError:
            pass
        except KafkaException as exc:
            raise self._error(exc, "produce") from exc
        deadline = time.monotonic() + QUEUE_FULL_TIMEOUT_S
        while True:
            self._producer.poll(0.05)
            try:
                self.produce_call(topic, value, key, headers=headers)
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise AbortableError("producer queue stayed full; aborting the transaction") from None
            except KafkaException as exc:
                raise self._error(exc, "produce") from exc

    def poll(self, timeout: float = 0.0) -> None:
        self._producer.poll(timeout)

    def commit(
        self,
        offsets: Sequence[TopicPartition],
        group_metadata: Any,
        timeout: float = COMMIT_TIMEOUT_S,
    ) -> None:
        """Send ``offsets`` to the transaction and commit it.

        Raises AbortableError (the caller aborts and rewinds) or FatalProducerError.
        Retriable errors are retried within ``timeout``.
        """
        self._check_usable()
        if not self.in_transaction:
            self.begin()
        deadline = time.monotonic() + timeout
        sent = not offsets
        while True:
            left = max(0.1, deadline - time.monotonic())
            try:
                if not sent:
                    self._producer.send_offsets_to_transaction(list(offsets), group_metadata, left)
                    sent = True
                self._producer.commit_transaction(left)
                self.in_transaction = False
                return
            except KafkaException as exc:
                if classify(exc) is RetriableError and time.monotonic() < deadline:
                    continue
                raise self._error(exc, "commit") from exc

    def abort(self, timeout: float = COMMIT_TIMEOUT_S) -> None:
        if not self.in_transaction:
            return
        self._check_usable()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._producer.abort_transaction(max(0.1, deadline - time.monotonic()))
                self.in_transaction = False
                return
            except KafkaException as exc:
                if classify(exc) is FatalProducerError:
                    raise self._error(exc, "abort") from exc
                if time.monotonic() >= deadline:
                    self.failed = f"abort did not complete: {exc.args[0].str()}"
                    raise FatalProducerError(self.failed) from exc
                time.sleep(ABORT_RETRY_BACKOFF_S)

    def flush(self, timeout: float = 10.0) -> int:
        return self._producer.flush(timeout)

    def close(self) -> None:
        """Release the client. An open transaction is left to the broker's timeout / the next init."""
        if self._producer is not None:
            try:
                self._producer.flush(0)
            except KafkaException:  # fenced or failed: nothing more to deliver, just let go
                pass
            # Dropping the last reference destroys the librdkafka handle and its threads now,
            # not whenever the garbage collector runs (possibly after the broker is gone).
            self._producer = None
            self.produce_call = None
