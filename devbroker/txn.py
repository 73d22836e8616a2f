"""Transaction coordinator: transactional ids -> producer id/epoch, the
partitions and group offsets of the ongoing transaction, end-transaction
markers, fencing, timeouts. State transitions are journaled; markers are
written synchronously (single node), so Prepare* states only survive a crash
between the journal write and the markers, and are completed on start."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from .broker import now_ms
from .log import ProduceError

if TYPE_CHECKING:
    from .broker import Broker

EMPTY = "Empty"
ONGOING = "Ongoing"
PREPARE_COMMIT = "PrepareCommit"
PREPARE_ABORT = "PrepareAbort"
COMPLETE_COMMIT = "CompleteCommit"
COMPLETE_ABORT = "CompleteAbort"
MAX_EPOCH = 32767


class TxnError(Exception):
    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


class Txn:
    __slots__ = ("tid", "pid", "epoch", "last_epoch", "state", "partitions", "groups", "offsets",
                 "timeout_ms", "start_ms")

    def __init__(self, tid: str, pid: int, epoch: int, timeout_ms: int):
        self.tid = tid
        self.pid = pid
        self.epoch = epoch
        self.last_epoch = -1
        self.state = EMPTY
        self.partitions: set[tuple[str, int]] = set()
        self.groups: set[str] = set()
        # group -> (topic, partition) -> (offset, metadata, leader epoch)
        self.offsets: dict[str, dict[tuple[str, int], tuple[int, str | None, int]]] = {}
        self.timeout_ms = timeout_ms
        self.start_ms = 0

    def record(self) -> dict[str, Any]:
        return {"k": "txn", "id": self.tid, "pid": self.pid, "epoch": self.epoch,
                "last_epoch": self.last_epoch, "state": self.state,
                "parts": sorted([t, p] for t, p in self.partitions), "groups": sorted(self.groups),
                "offsets": {g: [[t, p, o, m, le] for (t, p), (o, m, le) in offs.items()]
                            for g, offs in self.offsets.items()},
                "timeout": self.timeout_ms, "start": self.start_ms}


class TxnCoordinator:
    def __init__(self, broker: "Broker"):
        self.broker = broker
        self.by_id: dict[str, Txn] = {}
        self.by_pid: dict[int, Txn] = {}

    # ---- persistence ------------------------------------------------------------------------
    def load(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            t = Txn(r["id"], r["pid"], r["epoch"], r["timeout"])
            t.last_epoch = r.get("last_epoch", -1)
            t.state = r["state"]
            t.partitions = {(a, b) for a, b in r["parts"]}
            t.groups = set(r["groups"])
            t.offsets = {g: {(a, b): (o, m, le) for a, b, o, m, le in rows}
                         for g, rows in r["offsets"].items()}
            t.start_ms = r["start"]
            self.by_id[t.tid] = t
            self.by_pid[t.pid] = t

    def dump(self) -> list[dict[str, Any]]:
        return [t.record() for t in self.by_id.values()]

    def recover(self) -> None:
        """Finish transactions whose end was journaled but whose markers may be missing."""
        for t in list(self.by_id.values()):
            if t.state in (PREPARE_COMMIT, PREPARE_ABORT):
                self._complete(t, t.state == PREPARE_COMMIT, recovering=True)

    def _save(self, t: Txn) -> None:
        self.broker.journal.append(t.record())

    # ---- produce-path check -----------------------------------------------------------------
    def check_produce(self, tid: str | None, pid: int, epoch: int, topic: str, partition: int) -> None:
        t = self.by_id.get(tid) if tid else None
        if t is None or t.pid != pid:
            # Kafka verifies a transactional write with the coordinator of its transactional
            # id, which does not know that id / producer id pair
            raise ProduceError("invalid_producer_id_mapping",
                               "the transactional id is unknown or has another producer id")
        if epoch < t.epoch:
            raise ProduceError("invalid_producer_epoch", "producer epoch is fenced")
        if t.state != ONGOING or (topic, partition) not in t.partitions:
            raise ProduceError("invalid_txn_state", "Partition was not added to the transaction")

    def has_pending_offset(self, group: str, topic: str, partition: int) -> bool:
        for t in self.by_id.values():
            if t.state in (ONGOING, PREPARE_COMMIT) and (topic, partition) in t.offsets.get(group, ()):
                return True
        return False

    # ---- requests ---------------------------------------------------------------------------
    def init_producer_id(self, tid: str | None, timeout_ms: int, req_pid: int, req_epoch: int) -> tuple[int, int]:
        """Returns (producer id, epoch); raises TxnError."""
        b = self.broker
        if not tid:
            # Kafka's handleInitProducerId: an idempotent producer always gets a new producer
            # id at epoch 0, whatever id and epoch it gives (it bumps epochs on its own)
            return b.allocate_pid(), 0
        if timeout_ms <= 0 or timeout_ms > b.config.max_transaction_timeout_ms:
            raise TxnError("invalid_transaction_timeout")
        t = self.by_id.get(tid)
        if t is None:
            t = Txn(tid, b.allocate_pid(), 0, timeout_ms)
            self.by_id[tid] = t
            self.by_pid[t.pid] = t
            self._save(t)
            return t.pid, t.epoch
        # Kafka's prepareInitProducerIdTransit: a given producer id must be the current one
        # (its epoch is checked only when bumping, below, so in an ongoing transaction any
        # epoch of that id fences it)
        if req_pid >= 0 and req_pid != t.pid:
            raise TxnError("producer_fenced")
        if t.state in (PREPARE_COMMIT, PREPARE_ABORT):
            raise TxnError("concurrent_transactions")
        if t.state == ONGOING:
            # Fence the current producer by aborting its transaction with a bumped epoch, and
            # answer CONCURRENT_TRANSACTIONS; the retry bumps again (a new instance), or is the
            # fenced producer's own KIP-360 retry and gets the fencing epoch (the fence keeps
            # its epoch as the last epoch, as Kafka 4 does at transaction.version 2).
            self._fence_and_abort(t)
            raise TxnError("concurrent_transactions")
        if req_pid >= 0 and req_epoch != t.epoch:
            if req_epoch == t.last_epoch:
                return t.pid, t.epoch  # retry of a bump whose answer was lost
            raise TxnError("producer_fenced")
        # Kafka (TransactionMetadata.prepareIncrementProducerEpoch): a bump requested by the
        # current producer (its pid/epoch given) remembers the previous epoch so a lost answer
        # can be retried; a new producer instance (no pid given) clears it, so no older
        # instance can ever claim the new epoch through that retry path.
        t.last_epoch = req_epoch if req_pid >= 0 else -1
        if t.epoch >= MAX_EPOCH - 1:
            del self.by_pid[t.pid]
            t.pid = b.allocate_pid()
            t.epoch = 0
            self.by_pid[t.pid] = t
        else:
            t.epoch += 1
        t.timeout_ms = timeout_ms
        t.state = EMPTY
        t.partitions = set()
        t.groups = set()
        t.offsets = {}
        self._save(t)
        return t.pid, t.epoch

    def _validate(self, tid: str, pid: int, epoch: int) -> Txn:
        t = self.by_id.get(tid)
        if t is None or t.pid != pid:
            raise TxnError("invalid_producer_id_mapping")
        if epoch != t.epoch:
            raise TxnError("producer_fenced")
        if t.state in (PREPARE_COMMIT, PREPARE_ABORT):
            raise TxnError("concurrent_transactions")
        return t

    def _begin(self, t: Txn) -> None:
        if t.state != ONGOING:
            t.state = ONGOING
            t.start_ms = now_ms()
            t.partitions = set()
            t.groups = set()
            t.offsets = {}

    def add_partitions(self, tid: str, pid: int, epoch: int,
                       parts: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """Per-partition error code names; raises TxnError for request-wide errors."""
        t = self._validate(tid, pid, epoch)
        bad = {tp for tp in parts if self.broker.log(*tp) is None}
        if bad:
            return {tp: ("unknown_topic_or_partition" if tp in bad else "operation_not_attempted")
                    for tp in parts}
        new = set(parts) - t.partitions
        if new or t.state != ONGOING:
            self._begin(t)
            t.partitions |= set(parts)
            self._save(t)
        return {tp: "none" for tp in parts}

    def add_offsets(self, tid: str, pid: int, epoch: int, group: str) -> None:
        t = self._validate(tid, pid, epoch)
        if t.state != ONGOING or group not in t.groups:
            self._begin(t)
            t.groups.add(group)
            self._save(t)

    def txn_offset_commit(self, tid: str, pid: int, epoch: int, group: str,
                          offsets: dict[tuple[str, int], tuple[int, str | None, int]]) -> None:
        t = self._validate(tid, pid, epoch)
        if t.state != ONGOING:
            raise TxnError("invalid_txn_state")
        t.groups.add(group)
        t.offsets.setdefault(group, {}).update(offsets)
        self._save(t)

    def end_txn(self, tid: str, pid: int, epoch: int, commit: bool) -> None:
        t = self.by_id.get(tid)
        if t is None or t.pid != pid:
            raise TxnError("invalid_producer_id_mapping")
        if epoch != t.epoch:
            raise TxnError("producer_fenced")
        if t.state == ONGOING:
            t.state = PREPARE_COMMIT if commit else PREPARE_ABORT
            self._save(t)
            self._complete(t, commit)
            return
        if t.state == COMPLETE_COMMIT and commit or t.state == COMPLETE_ABORT and not commit:
            return  # retry of a completed end
        if t.state in (PREPARE_COMMIT, PREPARE_ABORT):
            raise TxnError("concurrent_transactions")
        raise TxnError("invalid_txn_state")

    def _complete(self, t: Txn, commit: bool, recovering: bool = False) -> None:
        b = self.broker
        for topic, partition in sorted(t.partitions):
            log = b.log(topic, partition)
            if log is None:
                continue
            # Kafka writes a marker to every partition of the transaction; after a crash
            # only partitions whose transaction is still open need one.
            if not recovering or t.pid in log.open_txns:
                log.append_marker(t.pid, t.epoch, commit)
        if commit:
            for group, offs in t.offsets.items():
                b.groups.store_offsets(group, offs)
        t.state = COMPLETE_COMMIT if commit else COMPLETE_ABORT
        t.partitions = set()
        t.groups = set()
        t.offsets = {}
        self._save(t)

    def _fence_and_abort(self, t: Txn) -> None:
        # Kafka 4 at transaction.version 2 (the level a new cluster runs at, whatever request
        # versions the client uses): the abort bumps the epoch once and keeps the producer's
        # epoch as the last epoch, so its old epoch is fenced at the partitions and the
        # coordinator, and the producer itself may take the new epoch with
        # InitProducerId(its id, its epoch) (KIP-360), until a new instance bumps it again.
        t.last_epoch = t.epoch
        t.epoch += 1
        t.state = PREPARE_ABORT
        self._save(t)
        self._complete(t, commit=False)

    def tick(self) -> None:
        """Abort transactions that outlived transaction.timeout.ms, bumping the epoch so
        the producer that started it is fenced on its next call."""
        now = now_ms()
        for t in list(self.by_id.values()):
            if t.state == ONGOING and now - t.start_ms > t.timeout_ms and t.epoch < MAX_EPOCH - 1:
                self._fence_and_abort(t)
