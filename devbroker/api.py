"""Request handlers for the data plane and admin APIs: ApiVersions, Metadata,
Produce, Fetch, ListOffsets, FindCoordinator, CreateTopics, DeleteTopics,
DescribeConfigs, DescribeCluster. Each takes (broker, spec, request, ctx) and
returns a kio response entity (or None: no response, e.g. Produce acks=0)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kio.schema.errors import ErrorCode as E

from .broker import NODE_ID, Broker
from .log import ProduceError
from .protocol import ZERO, ApiSpec, api_version_list, build

ALL_OPS = -2147483648  # authorized operations omitted


class Ctx:
    __slots__ = ("client_id", "client_host")

    def __init__(self, client_id: str, client_host: str):
        self.client_id = client_id
        self.client_host = client_host


async def api_versions(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    return s.make("ApiVersionsResponse", error_code=E.none, api_keys=api_version_list(s),
                  throttle_time=ZERO)


# ---- metadata ---------------------------------------------------------------------------------
def _partition_meta(s: ApiSpec, n: int) -> tuple:
    cls = s.resp.MetadataResponsePartition
    return tuple(build(cls, error_code=E.none, partition_index=i, leader_id=NODE_ID, leader_epoch=0,
                       replica_nodes=(NODE_ID,), isr_nodes=(NODE_ID,), offline_replicas=())
                 for i in range(n))


async def metadata(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    import uuid as _uuid

    names: list[str] | None
    if req.topics is None or (s.version == 0 and not req.topics):
        names = None
    else:
        names = [t.name for t in req.topics]
    auto = getattr(req, "allow_auto_topic_creation", True)
    topic_cls = s.resp.MetadataResponseTopic
    topics = []
    for name in (sorted(b.topics) if names is None else names):
        if name is None:
            continue
        t = b.topic(name, auto_create=auto)
        if t is None:
            from .broker import LEGAL_TOPIC

            code = E.unknown_topic_or_partition if LEGAL_TOPIC.match(name) else E.invalid_topic_exception
            topics.append(build(topic_cls, error_code=code, name=name, topic_id=_uuid.UUID(int=0),
                                is_internal=False, partitions=(),
                                topic_authorized_operations=ALL_OPS))
            continue
        topics.append(build(topic_cls, error_code=E.none, name=name, topic_id=t.id, is_internal=False,
                            partitions=_partition_meta(s, len(t.partitions)),
                            topic_authorized_operations=ALL_OPS))
    brokers = (s.make("MetadataResponseBroker", node_id=NODE_ID, host=b.advertised_host,
                      port=b.advertised_port, rack=None),)
    return s.make("MetadataResponse", throttle_time=ZERO, brokers=brokers, cluster_id=b.cluster_id,
                  controller_id=NODE_ID, topics=tuple(topics), cluster_authorized_operations=ALL_OPS)


# ---- produce ----------------------------------------------------------------------------------
async def produce(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    part_cls = s.resp.PartitionProduceResponse
    topic_cls = s.resp.TopicProduceResponse
    txns = b.txns
    out = []
    for td in req.topic_data:
        # Produce never creates a topic (Kafka creates one on Metadata only)
        t = b.topics.get(td.name)
        parts = []
        for pd in td.partition_data:
            code = E.none
            base = -1
            msg = None
            if t is None or not 0 <= pd.index < len(t.partitions):
                code = E.unknown_topic_or_partition
            elif _batch_count(pd.records) != 1:
                # Kafka's ProduceRequest.validateRecords (v3+): exactly one record batch
                code = E.invalid_record
            elif req.transactional_id is None and _has_txn_bit(pd.records):
                code = E.invalid_record
                msg = "transactional batch without a transactional id"
            else:
                log = t.partitions[pd.index]
                try:
                    base = log.append(pd.records or b"",
                                      lambda pid, ep, _t=td.name, _p=pd.index:
                                      txns.check_produce(req.transactional_id, pid, ep, _t, _p),
                                      t.max_message_bytes, t.timestamp_after_max_ms)
                except ProduceError as e:
                    code = getattr(E, e.code)
                    msg = e.message
            parts.append(build(part_cls, index=pd.index, error_code=code, base_offset=base,
                               log_append_time=None,
                               log_start_offset=t.partitions[pd.index].log_start if code == E.none else -1,
                               record_errors=(), error_message=msg))
        out.append(build(topic_cls, name=td.name, partition_responses=tuple(parts)))
    if req.acks == 0:
        return None
    return s.make("ProduceResponse", responses=tuple(out), throttle_time=ZERO)


def _batch_count(records: bytes | None) -> int:
    """How many record batches `records` holds by their length fields (0 when empty; 2 stands
    for "more than one"; a torn or corrupt one is left to the log's checks)."""
    if not records:
        return 0
    if len(records) < 12:
        return 1
    first = 12 + int.from_bytes(records[8:12], "big", signed=True)
    return 1 if first >= len(records) else 2


def _has_txn_bit(records: bytes | None) -> bool:
    return bool(records) and len(records) > 22 and bool(records[22] & 0x10)


# ---- fetch ------------------------------------------------------------------------------------
async def fetch(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    committed = getattr(req, "isolation_level", 0) == 1
    max_bytes = getattr(req, "max_bytes", 0x7FFFFFFF) or 0x7FFFFFFF
    min_bytes = req.min_bytes
    max_wait = req.max_wait.total_seconds()
    deadline = time.monotonic() + max_wait
    pd_cls = s.resp.PartitionData
    # partitions answered with an error carry empty records, as Kafka's MemoryRecords.EMPTY:
    # librdkafka rejects a null record set ("invalid MessageSetSize -1") and never sees the error
    ab_cls = s.resp.AbortedTransaction
    topic_cls = s.resp.FetchableTopicResponse
    while True:
        total = 0
        out = []
        logs = []
        for ft in req.topics:
            t = b.topics.get(ft.topic)
            parts = []
            for fp in ft.partitions:
                log = None if t is None or not 0 <= fp.partition < len(t.partitions) else t.partitions[fp.partition]
                if log is None:
                    parts.append(build(pd_cls, partition_index=fp.partition,
                                       error_code=E.unknown_topic_or_partition, high_watermark=-1,
                                       last_stable_offset=-1, log_start_offset=-1,
                                       aborted_transactions=None, records=b""))
                    continue
                logs.append(log)
                off = fp.fetch_offset
                hw = log.hw
                lso = log.lso
                if off < log.log_start or off > hw:
                    # an error partition carries no offsets (Kafka's FetchResponse.partitionResponse)
                    parts.append(build(pd_cls, partition_index=fp.partition,
                                       error_code=E.offset_out_of_range, high_watermark=-1,
                                       last_stable_offset=-1, log_start_offset=-1,
                                       aborted_transactions=None, records=b""))
                    continue
                upper = lso if committed else hw
                limit = min(fp.partition_max_bytes, max_bytes - total)
                data = log.read(off, upper, max(limit, 0), must_return_one=(total == 0))
                total += len(data)
                aborted = None
                if committed:
                    aborted = tuple(ab_cls(producer_id=pid, first_offset=first)
                                    for pid, first in log.aborted_in(off, upper)) if data else ()
                parts.append(build(pd_cls, partition_index=fp.partition, error_code=E.none,
                                   high_watermark=hw, last_stable_offset=lso,
                                   log_start_offset=log.log_start, aborted_transactions=aborted,
                                   preferred_read_replica=-1, records=data))
            out.append(build(topic_cls, topic=ft.topic, partitions=tuple(parts)))
        remaining = deadline - time.monotonic()
        if total >= min_bytes or remaining <= 0 or not logs:
            break
        fut = asyncio.get_running_loop().create_future()
        for log in logs:
            log.waiters.add(fut)
        try:
            await asyncio.wait_for(fut, remaining)
        except asyncio.TimeoutError:
            pass
        finally:
            for log in logs:
                log.waiters.discard(fut)
    return s.make("FetchResponse", throttle_time=ZERO, error_code=E.none, session_id=0,
                  responses=tuple(out))


# ---- list offsets -----------------------------------------------------------------------------
async def list_offsets(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    committed = getattr(req, "isolation_level", 0) == 1
    p_cls = s.resp.ListOffsetsPartitionResponse
    t_cls = s.resp.ListOffsetsTopicResponse
    out = []
    for lt in req.topics:
        parts = []
        for lp in lt.partitions:
            log = b.log(lt.name, lp.partition_index)
            if log is None:
                parts.append(build(p_cls, partition_index=lp.partition_index,
                                   error_code=E.unknown_topic_or_partition, timestamp=-1, offset=-1,
                                   leader_epoch=-1))
                continue
            ts = lp.timestamp
            rts = -1
            if ts == -2:
                off = log.log_start
            elif ts == -1:
                off = log.lso if committed else log.hw
            elif ts == -3:  # max timestamp (KIP-734): the first record holding the largest timestamp
                off, rts = log.offset_for_timestamp(log.max_ts[-1]) if log.bases else (-1, -1)
            else:  # the first record whose timestamp is >= ts, with that record's timestamp
                off, rts = log.offset_for_timestamp(ts)
            if ts not in (-1, -2) and off >= (log.lso if committed else log.hw):
                # Kafka (Partition.fetchOffsetForTimestamp) answers only offsets below the
                # last fetchable one: the LSO for read_committed, else the high watermark
                off, rts = -1, -1
            # no such record: Kafka answers offset, timestamp and leader epoch -1
            parts.append(build(p_cls, partition_index=lp.partition_index, error_code=E.none,
                               timestamp=rts, offset=off, leader_epoch=0 if off >= 0 else -1))
        out.append(build(t_cls, name=lt.name, partitions=tuple(parts)))
    return s.make("ListOffsetsResponse", throttle_time=ZERO, topics=tuple(out))


# ---- coordinators -----------------------------------------------------------------------------
async def find_coordinator(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    return s.make("FindCoordinatorResponse", throttle_time=ZERO, error_code=E.none, error_message=None,
                  node_id=NODE_ID, host=b.advertised_host, port=b.advertised_port)


# ---- admin ------------------------------------------------------------------------------------
async def create_topics(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    import uuid as _uuid

    r_cls = s.resp.CreatableTopicResult
    out = []
    for ct in req.topics:
        configs = {c.name: c.value for c in ct.configs}
        if ct.replication_factor not in (-1, 1):
            code, msg = "invalid_replication_factor", "devbroker has a single broker: replication factor must be 1"
        elif ct.assignments:
            code, msg = "invalid_request", "manual replica assignment is not supported"
        else:
            code, msg = b.create_topic(ct.name, ct.num_partitions, configs, req.validate_only)
        t = b.topics.get(ct.name) if not req.validate_only else None
        if code != "none":
            n = -1
        elif t is not None:
            n = len(t.partitions)
        else:  # validate_only: what the topic would have, as Kafka answers
            n = ct.num_partitions if ct.num_partitions > 0 else b.config.default_partitions
        out.append(build(r_cls, name=ct.name, topic_id=t.id if t and code == "none" else _uuid.UUID(int=0),
                         error_code=getattr(E, code), error_message=msg, topic_config_error_code=E.none,
                         num_partitions=n, replication_factor=1 if code == "none" else -1, configs=None))
    return s.make("CreateTopicsResponse", throttle_time=ZERO, topics=tuple(out))


async def delete_topics(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    r_cls = s.resp.DeletableTopicResult
    out = []
    for name in req.topic_names:
        code = b.delete_topic(name)
        out.append(build(r_cls, name=name, error_code=getattr(E, code), error_message=None))
    return s.make("DeleteTopicsResponse", throttle_time=ZERO, responses=tuple(out))


# Kafka 4.1's topic configs with their built-in defaults and config types (1 boolean,
# 2 string, 3 int, 5 long, 6 double, 7 list), as DescribeConfigs lists every one of them
TOPIC_DEFAULTS = {
    "cleanup.policy": ("delete", 7),
    "compression.gzip.level": ("-1", 3),
    "compression.lz4.level": ("9", 3),
    "compression.type": ("producer", 2),
    "compression.zstd.level": ("3", 3),
    "delete.retention.ms": ("86400000", 5),
    "file.delete.delay.ms": ("60000", 5),
    "flush.messages": ("9223372036854775807", 5),
    "flush.ms": ("9223372036854775807", 5),
    "follower.replication.throttled.replicas": ("", 7),
    "index.interval.bytes": ("4096", 3),
    "leader.replication.throttled.replicas": ("", 7),
    "local.retention.bytes": ("-2", 5),
    "local.retention.ms": ("-2", 5),
    "max.compaction.lag.ms": ("9223372036854775807", 5),
    "max.message.bytes": ("1048588", 3),
    "message.timestamp.after.max.ms": ("3600000", 5),
    "message.timestamp.before.max.ms": ("9223372036854775807", 5),
    "message.timestamp.type": ("CreateTime", 2),
    "min.cleanable.dirty.ratio": ("0.5", 6),
    "min.compaction.lag.ms": ("0", 5),
    "min.insync.replicas": ("1", 3),
    "preallocate": ("false", 1),
    "remote.log.copy.disable": ("false", 1),
    "remote.log.delete.on.disable": ("false", 1),
    "remote.storage.enable": ("false", 1),
    "retention.bytes": ("-1", 5),
    "retention.ms": ("604800000", 5),
    "segment.bytes": ("1073741824", 3),
    "segment.index.bytes": ("10485760", 3),
    "segment.jitter.ms": ("0", 5),
    "segment.ms": ("604800000", 5),
    "unclean.leader.election.enable": ("false", 1),
}
# the broker configs listed that Kafka can update dynamically (the others are read-only)
BROKER_DYNAMIC = {"message.max.bytes"}
BROKER_DEFAULTS = {
    "auto.create.topics.enable": ("true", 1),
    "num.partitions": ("1", 3),
    "default.replication.factor": ("1", 4),
    "offsets.topic.replication.factor": ("1", 4),
    "transaction.state.log.replication.factor": ("1", 4),
    "transaction.state.log.min.isr": ("1", 3),
    "transaction.max.timeout.ms": ("900000", 3),
    "group.initial.rebalance.delay.ms": ("0", 3),
    "group.min.session.timeout.ms": ("100", 3),
    "group.max.session.timeout.ms": ("3600000", 3),
    "message.max.bytes": ("1048588", 3),
}


async def describe_configs(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    res_cls = s.resp.DescribeConfigsResult
    c_cls = s.resp.DescribeConfigsResourceResult
    out = []
    for r in req.resources:
        entries: dict[str, tuple[str, int, int]] = {}  # name -> (value, type, source)
        code = E.none
        if r.resource_type == 2:  # topic
            t = b.topics.get(r.resource_name)
            if t is None:
                code = E.unknown_topic_or_partition
            else:
                for k, (v, typ) in TOPIC_DEFAULTS.items():
                    entries[k] = (v, typ, 5)
                if b.config.message_max_bytes != 1_048_588:  # inherited from the broker setting
                    entries["max.message.bytes"] = (str(b.config.message_max_bytes), 3, 4)
                for k, v in t.configs.items():
                    entries[k] = (v, TOPIC_DEFAULTS.get(k, ("", 2))[1], 1)
        elif r.resource_type == 4 and r.resource_name != str(NODE_ID):
            # Kafka: another broker's configs are that broker's to give; "" gives only the
            # cluster-wide dynamic defaults, of which devbroker has none
            if r.resource_name:
                code = E.invalid_request
        elif r.resource_type == 4:  # broker
            cfg = b.config
            vals = dict(BROKER_DEFAULTS)
            vals["num.partitions"] = (str(cfg.default_partitions), 3)
            vals["group.initial.rebalance.delay.ms"] = (str(cfg.initial_rebalance_delay_ms), 3)
            vals["group.min.session.timeout.ms"] = (str(cfg.min_session_timeout_ms), 3)
            vals["message.max.bytes"] = (str(cfg.message_max_bytes), 3)
            vals["transaction.max.timeout.ms"] = (str(cfg.max_transaction_timeout_ms), 3)
            for k, (v, typ) in vals.items():
                entries[k] = (v, typ, 5)
        else:
            code = E.invalid_request
        keys = r.configuration_keys
        configs = tuple(build(c_cls, name=k, value=v,
                              read_only=r.resource_type == 4 and k not in BROKER_DYNAMIC,
                              config_source=src,
                              is_sensitive=False, synonyms=(), config_type=typ, documentation=None,
                              is_default=(src == 5))
                        for k, (v, typ, src) in entries.items() if keys is None or k in keys)
        out.append(build(res_cls, error_code=code, error_message=None, resource_type=r.resource_type,
                         resource_name=r.resource_name, configs=configs))
    return s.make("DescribeConfigsResponse", throttle_time=ZERO, results=tuple(out))


async def describe_cluster(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    brokers = (s.make("DescribeClusterBroker", broker_id=NODE_ID, host=b.advertised_host,
                      port=b.advertised_port, rack=None),)
    return s.make("DescribeClusterResponse", throttle_time=ZERO, error_code=E.none, error_message=None,
                  endpoint_type=1, cluster_id=b.cluster_id, controller_id=NODE_ID, brokers=brokers,
                  cluster_authorized_operations=ALL_OPS)
