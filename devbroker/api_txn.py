"""Request handlers for transactions: InitProducerId, AddPartitionsToTxn,
AddOffsetsToTxn, TxnOffsetCommit, EndTxn."""

from __future__ import annotations

from typing import Any

from kio.schema.errors import ErrorCode as E

from .api import Ctx
from .broker import Broker
from .protocol import ZERO, ApiSpec, build
from .api_groups import OFFSET_METADATA_MAX_BYTES
from .txn import TxnError

# PRODUCER_FENCED (KIP-588) is only sent from these versions on; older ones get
# INVALID_PRODUCER_EPOCH, as Kafka does.
FENCED_SINCE = {22: 4, 24: 2, 25: 2, 26: 2, 28: 3}


def _code(s: ApiSpec, name: str) -> E:
    if name == "producer_fenced" and s.version < FENCED_SINCE.get(s.key, 0):
        name = "invalid_producer_epoch"
    return getattr(E, name)


async def init_producer_id(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    timeout_ms = int(req.transaction_timeout.total_seconds() * 1000)
    try:
        pid, epoch = b.txns.init_producer_id(req.transactional_id, timeout_ms,
                                             getattr(req, "producer_id", -1),
                                             getattr(req, "producer_epoch", -1))
        code = E.none
    except TxnError as e:
        pid, epoch, code = -1, -1, _code(s, e.code)
    return s.make("InitProducerIdResponse", throttle_time=ZERO, error_code=code, producer_id=pid,
                  producer_epoch=epoch)


async def add_partitions_to_txn(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    parts = [(t.name, p) for t in req.v3_and_below_topics for p in t.partitions]
    try:
        res = b.txns.add_partitions(req.v3_and_below_transactional_id, req.v3_and_below_producer_id,
                                    req.v3_and_below_producer_epoch, parts)
        codes = {tp: getattr(E, c) for tp, c in res.items()}
    except TxnError as e:
        c = _code(s, e.code)
        codes = {tp: c for tp in parts}
    pr = s.resp.AddPartitionsToTxnPartitionResult
    tr = s.resp.AddPartitionsToTxnTopicResult
    by_topic: dict[str, list] = {}
    for (t, p), c in codes.items():
        by_topic.setdefault(t, []).append(build(pr, partition_index=p, partition_error_code=c))
    out = tuple(build(tr, name=t, results_by_partition=tuple(ps)) for t, ps in by_topic.items())
    return s.make("AddPartitionsToTxnResponse", throttle_time=ZERO, results_by_topic_v3_and_below=out)


async def add_offsets_to_txn(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    try:
        b.txns.add_offsets(req.transactional_id, req.producer_id, req.producer_epoch, req.group_id)
        code = E.none
    except TxnError as e:
        code = _code(s, e.code)
    return s.make("AddOffsetsToTxnResponse", throttle_time=ZERO, error_code=code)


async def txn_offset_commit(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    code = "none"
    try:
        b.txns._validate(req.transactional_id, req.producer_id, req.producer_epoch)
    except TxnError as e:
        # Kafka writes the offsets to __consumer_offsets as the producer's transactional
        # batch: an epoch other than the current one is the partition leader's
        # INVALID_PRODUCER_EPOCH (as a stale Produce), not the coordinator's PRODUCER_FENCED
        code = "invalid_producer_epoch" if e.code == "producer_fenced" else e.code
    if code == "none":
        code = b.groups.validate_member(req.group_id, getattr(req, "generation_id", -1),
                                        getattr(req, "member_id", "") or "",
                                        getattr(req, "group_instance_id", None), for_commit=False)
    # per partition, as Kafka: unknown partitions are answered before the coordinator sees
    # the request, metadata over offset.metadata.max.bytes after it has checked the member
    own: dict[tuple[str, int], str] = {}
    offs = {}
    for t in req.topics:
        for p in t.partitions:
            if b.log(t.name, p.partition_index) is None:
                own[(t.name, p.partition_index)] = "unknown_topic_or_partition"
            elif code == "none" and len(p.committed_metadata or "") > OFFSET_METADATA_MAX_BYTES:
                own[(t.name, p.partition_index)] = "offset_metadata_too_large"
            else:
                offs[(t.name, p.partition_index)] = (p.committed_offset, p.committed_metadata,
                                                     getattr(p, "committed_leader_epoch", -1))
    if code == "none":
        try:
            b.txns.txn_offset_commit(req.transactional_id, req.producer_id, req.producer_epoch,
                                     req.group_id, offs)
        except TxnError as e:
            code = e.code
    p_cls = s.resp.TxnOffsetCommitResponsePartition
    t_cls = s.resp.TxnOffsetCommitResponseTopic
    out = tuple(build(t_cls, name=t.name,
                      partitions=tuple(build(p_cls, partition_index=p.partition_index,
                                             error_code=_code(s, own.get((t.name, p.partition_index), code)))
                                       for p in t.partitions))
                for t in req.topics)
    return s.make("TxnOffsetCommitResponse", throttle_time=ZERO, topics=out)


async def end_txn(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    try:
        b.txns.end_txn(req.transactional_id, req.producer_id, req.producer_epoch, req.committed)
        code = E.none
    except TxnError as e:
        code = _code(s, e.code)
    return s.make("EndTxnResponse", throttle_time=ZERO, error_code=code)
