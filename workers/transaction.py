"""One Kafka transaction of the worker: begun on the first output, committed with its offsets.

The pipeline (:mod:`workers.pipeline`) owns the loop and the error handling; a
:class:`Transaction` owns what one transaction has taken so far, so nothing about it is reset
by hand in several places. Protocol steps (DESIGN.md; numbered as in the pipeline's docstring):

1. :meth:`begin` — ``begin_transaction()`` when the first output is about to be produced.
2. :meth:`take` — a completed batch's next offsets (its outputs were produced by the pipeline);
   :meth:`add_record` — a record that must commit with them (audit, control).
3. :meth:`commit` — produce the drift deltas, ``send_offsets_to_transaction(offsets, group
   metadata)``, ``commit_transaction()``. Raises the producer's AbortableError or
   IndefiniteOutcome, on which the pipeline aborts and rewinds (step 4).

After a commit or an abort the pipeline starts a new :class:`Transaction`; an aborted one's
records that must not be lost (:attr:`carry_over`) are handed to the next.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from confluent_kafka import TopicPartition

from workers.kafka.producer import TransactionalProducer

Record = tuple[str, bytes | None, bytes]  # topic, key, value


class Transaction:
    """What one transaction has taken: offsets, per-route deployments, audited partitions, records."""

    def __init__(self, producer: TransactionalProducer, carry_over: Iterable[Record] = ()):
        self.producer = producer
        self.offsets: dict[tuple[str, int], int] = {}    # next offset per input partition emitted
        self.started_at: float | None = None             # monotonic time of begin()
        self.deployments: dict[str, str] = {}            # route -> the deployment its outputs came from
        self.applied: dict[tuple[str, int], str] = {}    # partitions whose `applied` audit is in here
        self.records: list[Record] = []                  # produced here, to be redone if aborted
                                                         # (not the `applied` audits: see add_record)
        self._carry: list[Record] = list(carry_over)

    @property
    def open(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        """Step 1 (idempotent); records carried over from an aborted transaction go first."""
        if self.started_at is not None:
            return
        self.producer.begin()
        self.started_at = time.monotonic()
        carry, self._carry = self._carry, []
        # Owned before they are produced: if producing one fails, the abort that follows must
        # carry every one of them again, not only those produced so far.
        self.records.extend(carry)
        for topic, key, value in carry:
            self.producer.produce(topic, value, key)

    def add_record(self, topic: str, key: bytes | None, value: bytes, redo: bool = True) -> None:
        """A record that must commit with this transaction's outputs.

        ``redo``: produce it again in the next transaction if this one aborts (refused and
        guard audits, control records). An ``applied`` audit passes False: it describes this
        transaction's outputs, which the replay after an abort audits anew, possibly under
        another deployment or (after a revoke) on another replica; carried over, it would
        claim a deployment for offsets whose outputs came from a different one.
        """
        if redo:
            # Before begin and produce: a record whose produce fails is still redone after the abort.
            if self.started_at is None:
                self._carry.append((topic, key, value))
                self.begin()
                return
            self.records.append((topic, key, value))
        self.begin()
        self.producer.produce(topic, value, key)

    def take(self, next_offsets: dict[tuple[str, int], int]) -> None:
        """Step 2: the offsets after a batch whose outputs were produced in this transaction."""
        self.offsets.update(next_offsets)

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Partitions revoked after their work was committed or aborted: no offsets for them."""
        for tp in partitions:
            self.offsets.pop(tp, None)
            self.applied.pop(tp, None)

    def commit(self, group_metadata, drift_records: Callable[[], list[Record]], timeout: float) -> None:
        """Step 3: drift deltas, offsets, commit. Raises on failure (the caller aborts and rewinds)."""
        if self.started_at is None:
            return
        # The deltas ride in the transaction that commits the offsets of the events they count:
        # every scored event is counted exactly once, across crashes too.
        for topic, key, value in drift_records():
            self.producer.produce(topic, value, key)
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.offsets.items()]
        self.producer.commit(offsets, group_metadata, timeout=timeout)

    def carry_over(self) -> list[Record]:
        """After an abort: the records the next transaction must produce again (audit, control)."""
        return self.records + self._carry  # one of the two is empty: _carry empties at begin()
