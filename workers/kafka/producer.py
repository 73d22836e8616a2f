"""The transactional producer: one per process, one open transaction at a time.

Guarantee: records produced between :meth:`TransactionalProducer.begin` and a
successful :meth:`commit` become visible to ``read_committed`` readers
atomically with the consumer offsets sent in that commit; after :meth:`abort`
none of them ever do. Limits: a transaction must commit within
``transaction.timeout.ms`` or the broker aborts it, and a producer fenced by a
newer instance of the same ``transactional.id`` can only exit.

Every transactional call (init, send_offsets + commit, abort) has a deadline that the
worker enforces, not only librdkafka: the call runs on a helper thread and the caller waits
at most its timeout plus :data:`STUCK_GRACE_S`, then raises :class:`TransactionStuck`
(the process must exit: the call cannot be cancelled). A commit or abort that times out
has an unknown outcome (:class:`IndefiniteOutcome`): the producer must not be used again,
because a delayed EndTxn could land on a later transaction of the same epoch (Jepsen's
2024 analysis of Kafka transactions); the caller continues with a new producer, whose
init_transactions bumps the epoch and settles the old transaction on the coordinator.

Test-only fault injection: ``SLUICE_TEST_FAULTS`` (see :class:`FaultPlan`) makes chosen
produce, commit or abort calls fail the way librdkafka fails them, through the same
classification and recovery paths, so the integration tests drive the worker's abort and
renewal paths against a real broker without a mock of Kafka. Unset, it costs nothing.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from workers.exit_codes import ConfigError, NotAuthorized
from workers.kafka.admin import is_authorization_error

# init_transactions waits for the broker to abort a previous incarnation's
# transaction; that can take a transaction round trip or a coordinator move.
INIT_TIMEOUT_S = 60.0
# One commit or abort. On Apache Kafka a killed transaction coordinator is replaced within
# seconds, but librdkafka 2.16 may keep waiting on the dead one until it returns (measured:
# 60 s and more, tests/integration/test_kafka_cluster_faults.py); past this the worker renews
# its producer, which finds the new coordinator.
COMMIT_TIMEOUT_S = 10.0
# How long past its own timeout a transactional call may take before the worker calls it
# stuck (librdkafka was seen waiting untimed in send_offsets_to_transaction after a broker
# restart, ignoring the timeout it was given).
STUCK_GRACE_S = 5.0
# How long produce() serves delivery reports while the local queue is full before
# it gives up (abort, rewind); well below max.poll.interval.ms, since the consumer
# is not polled meanwhile.
QUEUE_FULL_TIMEOUT_S = 10.0
# Between retries of a failed abort (e.g. a commit still in flight in librdkafka).
ABORT_RETRY_BACKOFF_S = 0.1
# While a transactional call is slower than this, the producer's metadata is refreshed every
# NUDGE_INTERVAL_S. librdkafka looks for a transaction's group coordinator again only when one
# of its brokers changes state (librdkafka issues #5456, #5511): after a broker restart it can
# wait for good on a coordinator handle it dropped, ignoring the call's timeout (measured here:
# send_offsets_to_transaction blocked 35 s and more on devbroker and on Apache Kafka 4.1). A
# metadata request reconnects the brokers, and their state changes wake the lookup.
NUDGE_AFTER_S = 1.0
NUDGE_INTERVAL_S = 1.0
NUDGE_METADATA_TIMEOUT_S = 1.0
# A call still stuck past its deadline is abandoned with its producer (the thread inside
# librdkafka cannot be cancelled) and the worker continues under a new producer. An abandoned
# producer is kept, never destroyed, until its call returns (destroying a handle while a thread
# is inside one of its calls would free memory that call goes on using), then released. Each
# one still stuck holds its buffers, so with more than this many stuck at once the process
# exits 75 instead (chaos runs: one per broker restart; counted for the process's life, four
# restarts ended long-lived replicas with 75).
MAX_ABANDONED_PRODUCERS = 3
# send_offsets_to_transaction normally returns in milliseconds. Stuck as above, it is given up
# after this (librdkafka's own timeout, then a short grace), so that outputs resume within
# seconds of a broker restart under a new producer instead of after the whole commit deadline
# (measured: 32 s with the 30 s commit deadline, tests/integration/test_broker_restart_recovery.py).
SEND_OFFSETS_TIMEOUT_S = 5.0
SEND_OFFSETS_GRACE_S = 1.0
log = logging.getLogger("sluice.kafka")

# While waiting on a transactional call the caller wakes this often to look at its stop
# deadline, which a SIGTERM can set or move while it waits.
STOP_CHECK_INTERVAL_S = 0.25
# (the abandoned client, its call thread, the stuck call's done event)
_ABANDONED: list = []


def stuck_producers() -> int:
    """How many abandoned producers are still inside a stuck call. A process leaving with any
    must end with ``os._exit``: the interpreter's exit would destroy their clients under the call."""
    _reap_abandoned()
    return len(_ABANDONED)


def _reap_abandoned() -> None:
    """Release abandoned clients whose stuck call has returned meanwhile."""
    for entry in list(_ABANDONED):
        client, calls, done = entry
        if done is None or done.is_set():
            _ABANDONED.remove(entry)
            calls.stop()
            try:
                client.flush(0)
            except KafkaException:
                pass


class FatalProducerError(RuntimeError):
    """The producer cannot go on (fenced, unknown producer id, ...): the process must exit."""


class AbortableError(RuntimeError):
    """The current transaction failed and was (or must be) aborted; rewind and go on."""


class RetriableError(RuntimeError):
    """The operation may be retried as is."""


class IndefiniteOutcome(RuntimeError):
    """A commit or abort timed out: it may or may not have landed. This producer must not be
    used again; continue with a new one (a fresh epoch) and rewind to the committed offsets."""


class TransactionStuck(RuntimeError):
    """A transactional call did not return within its deadline plus STUCK_GRACE_S; it cannot be
    cancelled, so the process must exit (75) and let its supervisor restart it."""


class StopDeadlinePassed(TransactionStuck):
    """A transactional call was still running when the worker's stop deadline (SIGTERM plus
    ``shutdown_timeout_ms``, or a second signal) passed: its producer is given up like a stuck
    one, and the worker leaves with what it has committed (exit 1)."""


# --------------------------------------------------------------- test-only fault injection

#: Environment variable of the fault plan. Test-only: never set it in production.
FAULTS_ENV = "SLUICE_TEST_FAULTS"
#: What each call may be made to do (see FaultPlan).
FAULT_KINDS: dict[str, tuple[str, ...]] = {
    "produce": ("abortable",),
    "commit": ("abortable", "indefinite", "indefinite-committed", "hang"),
    "abort": ("indefinite",),
}


class FaultPlan:
    """Which produce / commit / abort calls of this process fail, and how (test-only).

    Parsed from ``SLUICE_TEST_FAULTS``: comma-separated ``CALL:KIND@N`` entries, N counted
    from 1 over every producer of the process (a renewed producer does not start again):

    - ``produce:abortable@N``: the Nth record produced fails with an abortable error; the
      transaction stays failed (every produce and commit raises it) until it is aborted, as
      in librdkafka.
    - ``commit:abortable@N``: the Nth commit's ``commit_transaction`` fails with an abortable
      error (its offsets were sent).
    - ``commit:indefinite@N``: the Nth commit times out without reaching the broker: an
      unknown outcome, the transaction left open for the next epoch to abort.
    - ``commit:indefinite-committed@N``: the Nth commit lands but its answer is lost: an
      unknown outcome although the transaction committed.
    - ``commit:hang@N``: the Nth commit's ``send_offsets_to_transaction`` never returns,
      ignoring its timeout, as librdkafka's did after broker restarts: the producer must be
      abandoned (stuck detection, or the stop deadline when a SIGTERM comes meanwhile).
    - ``abort:indefinite@N``: the Nth abort times out without reaching the broker.
    """

    def __init__(self, spec: str):
        self.spec = spec
        self._at: dict[str, dict[int, str]] = {call: {} for call in FAULT_KINDS}
        self._count: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self._lock = threading.Lock()  # abort may run on a revoke callback's thread
        for entry in (e.strip() for e in spec.split(",")):
            if not entry:
                continue
            call, _, rest = entry.partition(":")
            kind, _, n = rest.partition("@")
            if call not in FAULT_KINDS or kind not in FAULT_KINDS[call] or not n.isdigit() or int(n) < 1:
                allowed = ", ".join(f"{c}:{k}@N" for c, kinds in FAULT_KINDS.items() for k in kinds)
                raise ConfigError(f"{FAULTS_ENV}: cannot read {entry!r}; write comma-separated {allowed} "
                                  "(N >= 1), or unset it (test-only)")
            self._at[call][int(n)] = kind

    def __bool__(self) -> bool:
        return any(self._at.values())

    def has(self, call: str) -> bool:
        """Whether any fault is planned for ``call``."""
        return bool(self._at[call])

    def next(self, call: str) -> str | None:
        """Count one ``call``; the fault kind planned for this one, or None."""
        with self._lock:
            self._count[call] += 1
            return self._at[call].get(self._count[call])

    def count(self, call: str) -> int:
        """How many ``call`` calls were counted so far."""
        return self._count[call]


_PROCESS_FAULTS: FaultPlan | None = None


def process_faults() -> FaultPlan | None:
    """The process's fault plan from ``SLUICE_TEST_FAULTS`` (parsed once), or None when unset."""
    global _PROCESS_FAULTS
    spec = os.environ.get(FAULTS_ENV, "").strip()
    if not spec:
        return None
    if _PROCESS_FAULTS is None or _PROCESS_FAULTS.spec != spec:
        _PROCESS_FAULTS = FaultPlan(spec)
    return _PROCESS_FAULTS


def _hang(*_args) -> None:
    """An injected ``commit:hang``: blocks its call thread for good (test-only)."""
    threading.Event().wait()


def _injected(call: str, n: int, *, requires_abort: bool = False, retriable: bool = False) -> KafkaException:
    """The librdkafka error an injected fault raises (a request that timed out)."""
    return KafkaException(KafkaError(KafkaError._TIMED_OUT, f"{call} #{n} failed, injected by {FAULTS_ENV}",
                                     retriable=retriable, txn_requires_abort=requires_abort))


class _CallThread:
    """Runs blocking librdkafka transactional calls so that the caller can stop waiting.

    One daemon thread per producer; a call costs a queue hand-off (tens of microseconds),
    paid once per transaction, not per record.
    """

    def __init__(self, name: str):
        self.current: threading.Event | None = None
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            fn, args, box, done = item
            try:
                box["result"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
                box["error"] = exc
            done.set()
            # No reference to the client may outlive the call (an exception's traceback would
            # keep this frame, and the client with it, until a full garbage collection).
            del fn, args, box, done, item

    def call(self, what: str, timeout: float, fn: Callable, *args, nudge: Callable[[], Any] | None = None,
             grace: float = STUCK_GRACE_S, stop_by: Callable[[], float | None] | None = None):
        """``fn(*args)`` on the call thread; its result, or its exception raised here.

        Raises TransactionStuck past ``timeout + grace``, or StopDeadlinePassed once the
        monotonic time ``stop_by()`` (read again at every wake-up) has passed."""
        stop_at = stop_by() if stop_by is not None else None
        if stop_at is not None and time.monotonic() >= stop_at:
            raise StopDeadlinePassed(f"{what} not started: the stop deadline had passed")
        box: dict = {}
        done = threading.Event()
        self.current = done  # an abandoned producer is released once this is set
        self._calls.put((fn, args, box, done))
        deadline = time.monotonic() + timeout + grace
        next_nudge = time.monotonic() + NUDGE_AFTER_S if nudge is not None else math.inf
        while not done.is_set():
            now = time.monotonic()
            stop_at = stop_by() if stop_by is not None else None
            if stop_at is not None and now >= stop_at:
                raise StopDeadlinePassed(f"{what} was still running when the stop deadline passed")
            if now >= deadline:
                raise TransactionStuck(f"{what} did not return within {timeout + grace:.0f}s "
                                       "(its timeout was ignored inside librdkafka)")
            if now >= next_nudge:
                try:
                    nudge()
                except (KafkaException, RuntimeError):  # brokers still down: nudge again later
                    pass
                next_nudge = time.monotonic() + NUDGE_INTERVAL_S
                continue
            wake = min(deadline, next_nudge, now + STOP_CHECK_INTERVAL_S, math.inf if stop_at is None else stop_at)
            done.wait(max(0.0, wake - now))
        if "error" in box:
            err = box.pop("error")
            raise err
        return box.pop("result", None)

    def stop(self) -> None:
        self._calls.put(None)


def as_producer_error(exc: KafkaException, during: str) -> Exception:
    """The worker's error for a librdkafka error raised by a producer call."""
    err: KafkaError = exc.args[0]
    if is_authorization_error(err):
        # A missing ACL fails every retry the same way: say so, and let the worker exit 2.
        return NotAuthorized(f"{during} failed, not authorized: {err.str()} (see the README, section "
                             "\"Secured clusters\", for the ACLs a replica needs)")
    kind = classify(exc)
    if kind is FatalProducerError:
        return FatalProducerError(f"{during} failed fatally: {exc.args[0].str()}")
    return AbortableError(f"{during} failed: {exc.args[0].str()}")


def is_refused_end_txn(exc: KafkaException) -> bool:
    """EndTxn refused with INVALID_TXN_STATE. librdkafka makes it fatal, but it comes from a race
    inside librdkafka (issue #4849: abort_transaction right after a transaction began; seen here
    on Apache Kafka 4.1 when an injected produce failure aborted a transaction a few ms old), not
    from another instance: the transaction did not end, and a new producer's init_transactions
    aborts it. A fenced producer fails with PRODUCER_FENCED / INVALID_PRODUCER_EPOCH instead."""
    err: KafkaError = exc.args[0]
    return err.code() == KafkaError.INVALID_TXN_STATE or "(INVALID_TXN_STATE)" in err.str()


def classify(exc: KafkaException) -> type[Exception]:
    err: KafkaError = exc.args[0]
    if err.fatal():
        return FatalProducerError
    if err.txn_requires_abort():
        return AbortableError
    if err.retriable():
        return RetriableError
    return AbortableError


class _AuthorizationWatch:
    """Sits between librdkafka and the configured logger and error_cb, keeping the last
    authorization failure the client reported. librdkafka names a missing ACL only there
    (e.g. AddPartitionsToTxn refused: "... (TOPIC_AUTHORIZATION_FAILED)"); the calls that
    fail next say only "Erroneous state"."""

    def __init__(self, logger: Any):
        self.logger = logger
        self.failure: str | None = None

    def log(self, level: int, fmt: str, *args) -> None:
        text = " ".join(str(a) for a in args) if args else fmt
        if "AUTHORIZATION_FAILED" in text or "authorization failed" in text:
            self.failure = text
        if self.logger is not None:
            self.logger.log(level, fmt, *args)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging's naming)
        return self.logger is None or self.logger.isEnabledFor(level)

    def error_cb(self, err: KafkaError) -> None:
        if is_authorization_error(err):
            self.failure = err.str()


class TransactionalProducer:
    """Wraps a transactional confluent-kafka Producer with the worker's error handling."""

    def __init__(self, conf: dict[str, Any], faults: FaultPlan | None = None):
        """``faults``: a test-only fault plan; by default the process's (``SLUICE_TEST_FAULTS``)."""
        self._authz = _AuthorizationWatch(conf.get("logger"))
        conf = {**conf, "logger": self._authz}
        conf.setdefault("error_cb", self._authz.error_cb)
        self._producer = Producer(conf)
        self._calls = _CallThread(f"txn-{conf.get('transactional.id', '')}")
        self.in_transaction = False
        # Set once a fatal error was seen: every later transactional call fails at once instead
        # of waiting on a producer librdkafka has already given up (e.g. from a revoke callback
        # while the process closes after being fenced).
        self.failed: str | None = None
        # Set with IndefiniteOutcome: the caller must replace this producer (a fresh epoch).
        self.outcome_unknown = False
        # Monotonic time past which no transactional call is waited on any longer (set by the
        # worker when it is asked to stop); None: only the calls' own deadlines apply.
        self.stop_by: float | None = None
        self.produce_call = self._producer.produce  # bound once: the hot path calls it per record
        self._faults = faults if faults is not None else process_faults()
        # The injected error that failed the open transaction (librdkafka's abortable state):
        # every produce and commit raises it again until the transaction is aborted.
        self._injected_failure: KafkaException | None = None
        if self._faults is not None and self._faults:
            self.produce_call = self._produce_with_faults

    def _produce_with_faults(self, topic: str, value: bytes | None, key: bytes | None = None, **kw: Any) -> None:
        """produce_call under a fault plan: raises as librdkafka does for a failed transaction."""
        if self._injected_failure is None and self._faults.has("produce"):
            if self._faults.next("produce") is not None:
                self._injected_failure = _injected("produce", self._faults.count("produce"), requires_abort=True)
        if self._injected_failure is not None:
            raise self._injected_failure
        self._producer.produce(topic, value, key, **kw)

    def _error(self, exc: KafkaException, during: str) -> Exception:
        try:
            self._producer.poll(0)  # serve the log lines and error events that say why
        except KafkaException:  # poll re-raises a fatal error (e.g. fenced): `exc` already says it
            pass
        if self._authz.failure is not None and not exc.args[0].fatal():
            # Reported during this transaction (it is cleared at every commit and abort).
            self.failed = f"not authorized: {self._authz.failure}"
            return NotAuthorized(f"{during} failed, not authorized: {self._authz.failure} (see the README, "
                                 "section \"Secured clusters\", for the ACLs a replica needs)")
        err = as_producer_error(exc, during)
        if isinstance(err, FatalProducerError):
            self.failed = str(err)
        return err

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise FatalProducerError(f"producer unusable after a fatal error: {self.failed}")

    def init(self, timeout: float = INIT_TIMEOUT_S) -> None:
        try:
            self._calls.call("init_transactions", timeout, self._producer.init_transactions, timeout,
                             nudge=self._nudge, stop_by=self._stop_by)
        except StopDeadlinePassed as exc:
            raise self._abandon("init_transactions", exc) from exc
        except KafkaException as exc:
            # The client's log lines (why it failed) are delivered by poll(): serve them first.
            self._producer.poll(0)
            err = as_producer_error(exc, "init_transactions")
            if isinstance(err, NotAuthorized):
                raise err from exc
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

        Raises AbortableError (the caller aborts and rewinds), IndefiniteOutcome (timed out:
        the caller renews the producer and rewinds), FatalProducerError or TransactionStuck.
        Retriable errors are retried within ``timeout``.
        """
        self._check_usable()
        if not self.in_transaction:
            self.begin()
        fault = self._faults.next("commit") if self._faults is not None and self._faults.has("commit") else None
        deadline = time.monotonic() + timeout
        sent = not offsets
        while True:
            left = max(0.1, deadline - time.monotonic())
            try:
                if self._injected_failure is not None:
                    raise self._injected_failure
                if not sent:
                    limit = min(left, SEND_OFFSETS_TIMEOUT_S)
                    send_offsets = self._producer.send_offsets_to_transaction
                    if fault == "hang":
                        log.warning("commit #%d hangs in send_offsets_to_transaction, injected by %s",
                                    self._faults.count("commit"), FAULTS_ENV)
                        send_offsets = _hang
                    self._calls.call("send_offsets_to_transaction", limit, send_offsets,
                                     list(offsets), group_metadata, limit, nudge=self._nudge, grace=SEND_OFFSETS_GRACE_S,
                                     stop_by=self._stop_by)
                    sent = True
                if fault is not None and fault != "hang":
                    self._commit_fault(fault, left)
                self._calls.call("commit_transaction", left, self._producer.commit_transaction, left,
                                 nudge=self._nudge, stop_by=self._stop_by)
                self.in_transaction = False
                self._authz.failure = None  # a transient one (e.g. during an ACL change) is over
                return
            except KafkaException as exc:
                if classify(exc) is RetriableError:
                    if time.monotonic() < deadline and fault is None:
                        continue
                    raise self._unknown_outcome("commit", timeout, exc) from exc
                if is_refused_end_txn(exc):
                    raise self._unknown_outcome("commit", timeout, exc) from exc
                raise self._error(exc, "commit") from exc
            except TransactionStuck as exc:
                raise self._abandon("commit", exc) from exc

    def _stop_by(self) -> float | None:
        return self.stop_by

    def _nudge(self) -> None:
        """Refresh metadata so that librdkafka looks for the transaction's coordinators again."""
        self._producer.list_topics(timeout=NUDGE_METADATA_TIMEOUT_S)

    def _abandon(self, during: str, stuck: TransactionStuck) -> Exception:
        """A call stuck past its deadline: give this producer up (its outcome is unknown), or,
        past MAX_ABANDONED_PRODUCERS in this process, let the process exit (75)."""
        _reap_abandoned()
        stuck_now = len(_ABANDONED) + 1
        if stuck_now > MAX_ABANDONED_PRODUCERS and not isinstance(stuck, StopDeadlinePassed):
            return stuck  # (at a stop the process is leaving anyway: it exits 1, not 75)
        self.failed = f"{during} stuck: {stuck}"
        self.outcome_unknown = True
        self._stuck = True
        return IndefiniteOutcome(f"{during} stuck ({stuck}); abandoning this producer "
                                 f"({stuck_now} stuck now, at most {MAX_ABANDONED_PRODUCERS})")

    def _commit_fault(self, fault: str, left: float) -> None:
        """Raise the injected fault in place of (or, indefinite-committed, after) commit_transaction."""
        n = self._faults.count("commit")
        if fault == "abortable":
            self._injected_failure = _injected("commit", n, requires_abort=True)
            raise self._injected_failure
        if fault == "indefinite-committed":
            self._calls.call("commit_transaction", left, self._producer.commit_transaction, left,
                             stop_by=self._stop_by)
        raise _injected("commit", n, retriable=True)  # as a commit whose deadline passed

    def _unknown_outcome(self, during: str, timeout: float, exc: KafkaException) -> IndefiniteOutcome:
        """Mark this producer unusable after a commit or abort of unknown outcome (see IndefiniteOutcome)."""
        self.failed = f"{during} did not complete: {exc.args[0].str()}"
        self.outcome_unknown = True
        return IndefiniteOutcome(f"{during} did not complete (deadline {timeout:.0f}s): {exc.args[0].str()}")

    def abort(self, timeout: float = COMMIT_TIMEOUT_S) -> None:
        if not self.in_transaction:
            return
        self._check_usable()
        if self._faults is not None and self._faults.has("abort") and self._faults.next("abort") is not None:
            exc = _injected("abort", self._faults.count("abort"), retriable=True)
            raise self._unknown_outcome("abort", timeout, exc) from exc
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.1, deadline - time.monotonic())
            try:
                try:
                    self._calls.call("abort_transaction", left, self._producer.abort_transaction, left,
                                     nudge=self._nudge, stop_by=self._stop_by)
                except TransactionStuck as exc:
                    raise self._abandon("abort", exc) from exc
                self.in_transaction = False
                self._authz.failure = None
                self._injected_failure = None
                return
            except KafkaException as exc:
                if is_refused_end_txn(exc):
                    raise self._unknown_outcome("abort", timeout, exc) from exc
                if classify(exc) is FatalProducerError:
                    raise self._error(exc, "abort") from exc
                if time.monotonic() >= deadline:
                    raise self._unknown_outcome("abort", timeout, exc) from exc
                time.sleep(ABORT_RETRY_BACKOFF_S)

    def flush(self, timeout: float = 10.0) -> int:
        return self._producer.flush(timeout)

    def close(self) -> None:
        """Release the client. An open transaction is left to the broker's timeout / the next init."""
        if self._producer is not None and getattr(self, "_stuck", False):
            _ABANDONED.append((self._producer, self._calls, self._calls.current))  # released once it returns
            self._producer = None
            self.produce_call = None
            return
        if self._producer is not None:
            self._calls.stop()
            try:
                self._producer.flush(0)
            except KafkaException:  # fenced or failed: nothing more to deliver, just let go
                pass
            # Dropping the last reference destroys the librdkafka handle and its threads now,
            # not whenever the garbage collector runs (possibly after the broker is gone).
            self._producer = None
            self.produce_call = None
