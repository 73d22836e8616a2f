"""devbroker through a raw Kafka-protocol client (kio codecs over a socket), for
semantics real clients do not let a test provoke on demand: duplicate and
out-of-order sequences, corrupt batches, unadded transactional partitions,
fetch long polling and max-bytes rules, UNSTABLE_OFFSET_COMMIT."""

from __future__ import annotations

import importlib
import io
import socket
import struct
import threading
import time
from datetime import timedelta

import pytest
from crc32c import crc32c
from kio.schema.errors import ErrorCode
from kio.schema.request_header.v1.header import RequestHeader as H1
from kio.schema.request_header.v2.header import RequestHeader as H2
from kio.serial import entity_reader, entity_writer


def make_batch(n: int = 3, pid: int = -1, epoch: int = -1, seq: int = -1, txn: bool = False,
               size: int = 2) -> bytes:
    recs = b""
    for i in range(n):
        val = b"v" * size
        body = bytes([0, 0, (i * 2) & 0x7F, 1]) + _varint(len(val)) + val + b"\x00"
        recs += _varint(len(body)) + body
    ts = int(time.time() * 1000)
    after = struct.pack(">hiqqqhii", 0x10 if txn else 0, n - 1, ts, ts, pid, epoch, seq, n) + recs
    return struct.pack(">qiibI", 0, 9 + len(after), 0, 2, crc32c(after)) + after


def _varint(v: int) -> bytes:
    v = (v << 1) ^ (v >> 63)
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def _entity(mod, kind: str):
    return next(v for v in vars(mod).values()
                if isinstance(v, type) and v.__module__ == mod.__name__
                and getattr(getattr(v, "__type__", None), "name", None) == kind)


# What a Kafka client retries rather than reports: the coordinator is loading its partition of
# __consumer_offsets / __transaction_state (on a fresh Kafka the first FindCoordinator creates
# those topics), moved, or not elected yet; a partition's leadership not yet known to the broker
# that was asked (right after topic creation, metadata reaches brokers a moment later).
COORDINATOR_RETRIABLE = {ErrorCode.coordinator_load_in_progress, ErrorCode.coordinator_not_available,
                         ErrorCode.not_coordinator}
LEADER_RETRIABLE = {ErrorCode.not_leader_or_follower, ErrorCode.leader_not_available,
                    ErrorCode.unknown_topic_or_partition}
RETRY_FOR_S = 30.0


def until(call, done, timeout: float = RETRY_FOR_S, pause: float = 0.05):
    """call() until done(answer) or the timeout; the last answer. For what a client retries
    or waits for: CONCURRENT_TRANSACTIONS while a transaction completes, UNSTABLE_OFFSET_COMMIT
    until its markers are written, an LSO that Kafka moves once the markers are written (after
    EndTxn answers; devbroker writes them first: see devbroker/README.md)."""
    deadline = time.monotonic() + timeout
    while True:
        r = call()
        if done(r) or time.monotonic() >= deadline:
            return r
        time.sleep(pause)


def not_concurrent(r) -> bool:
    return r.error_code != ErrorCode.concurrent_transactions


def _error_codes(entity) -> set:
    """Every error code in a response, nested ones included (per topic, partition, group)."""
    out = set()
    if isinstance(entity, tuple):
        for x in entity:
            out |= _error_codes(x)
    elif hasattr(entity, "__dataclass_fields__"):
        for name in entity.__dataclass_fields__:
            v = getattr(entity, name)
            if name.endswith("error_code"):
                out.add(v)
            elif isinstance(v, tuple) or hasattr(v, "__dataclass_fields__"):
                out |= _error_codes(v)
    return out


class RawClient:
    """One connection; requests are built from kio request classes by api name/version.

    Like a real client, it sends group and transaction requests to the coordinator that
    FindCoordinator names (`coord`), and retries what clients retry: the coordinator errors
    above, and (in `produce`/`fetch`) a partition whose leader the broker does not know yet.
    Every other answer, error or not, goes back to the test as it came."""

    def __init__(self, bootstrap: str):
        host, port = bootstrap.rsplit(":", 1)
        self.addr = (host, int(port))
        self.sock = socket.create_connection(self.addr, timeout=30)
        self.corr = 0
        self.peers: dict[tuple[str, int], RawClient] = {}
        self.coordinators: dict[tuple[int, str], RawClient] = {}
        self.not_ready = 0  # answers retried because a coordinator or leader was not ready

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.sock.close()

    def mod(self, api: str, version: int, kind: str):
        return importlib.import_module(f"kio.schema.{api}.v{version}.{kind}")

    def call(self, api: str, version: int, **fields):
        req_mod = self.mod(api, version, "request")
        resp_mod = self.mod(api, version, "response")
        req_cls = _entity(req_mod, "request")
        resp_cls = _entity(resp_mod, "response")
        self.corr += 1
        hcls = H2 if req_cls.__flexible__ else H1
        buf = io.BytesIO()
        entity_writer(hcls)(buf, hcls(request_api_key=req_cls.__api_key__, request_api_version=version,
                                      correlation_id=self.corr, client_id="raw"))
        entity_writer(req_cls)(buf, req_cls(**fields))
        data = buf.getvalue()
        self.sock.sendall(struct.pack(">i", len(data)) + data)
        if api == "produce" and fields.get("acks") == 0:
            return None
        size = struct.unpack(">i", self._read(4))[0]
        frame = self._read(size)
        hdr_cls = resp_cls.__header_schema__
        hdr, n = entity_reader(hdr_cls)(frame, 0)
        assert hdr.correlation_id == self.corr
        resp, _ = entity_reader(resp_cls)(frame, n)
        return resp

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    # -- coordinators, as clients find them -----------------------------------------------------
    def _connection(self, host: str, port: int) -> "RawClient":
        if (host, port) == self.addr:
            return self
        if (host, port) not in self.peers:
            self.peers[(host, port)] = RawClient(f"{host}:{port}")
        return self.peers[(host, port)]

    def coordinator(self, key: str, key_type: int = 0) -> "RawClient":
        """FindCoordinator (key_type 0: group, 1: transaction), retried while not available."""
        cached = self.coordinators.get((key_type, key))
        if cached is not None:
            return cached
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            r = self.call("find_coordinator", 3, key=key, key_type=key_type)
            if r.error_code == ErrorCode.none:
                conn = self.coordinators[(key_type, key)] = self._connection(r.host, r.port)
                return conn
            assert r.error_code in COORDINATOR_RETRIABLE and time.monotonic() < deadline, r
            self.not_ready += 1
            time.sleep(0.1)

    def coord(self, key: str, api: str, version: int, key_type: int = 0, **fields):
        """`api` on the coordinator of `key`, retried while it is loading, moving or unknown."""
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            r = self.coordinator(key, key_type).call(api, version, **fields)
            transient = _error_codes(r) & COORDINATOR_RETRIABLE
            if not transient or time.monotonic() >= deadline:
                return r
            if transient - {ErrorCode.coordinator_load_in_progress}:
                self.coordinators.pop((key_type, key), None)  # look it up again
            self.not_ready += 1
            time.sleep(0.1)

    def group(self, group: str, api: str, version: int, **fields):
        return self.coord(group, api, version, key_type=0, **fields)

    def txn(self, tid: str, api: str, version: int, **fields):
        return self.coord(tid, api, version, key_type=1, **fields)

    def _leader_retried(self, send, codes):
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            r = send()
            if codes(r) & LEADER_RETRIABLE and time.monotonic() < deadline:
                self.not_ready += 1
                time.sleep(0.1)  # a client refreshes its metadata and tries again
                continue
            return r

    # -- helpers ------------------------------------------------------------------------------
    def produce(self, topic: str, partition: int, records: bytes, txn_id: str | None = None,
                retry: bool = True, whole: bool = False):
        """(error code, base offset), or the partition's whole answer; `retry=False` for a
        topic that is meant not to exist."""
        m = self.mod("produce", 9, "request")

        def send():
            return self.call("produce", 9, transactional_id=txn_id, acks=-1, timeout=timedelta(seconds=5),
                             topic_data=(m.TopicProduceData(name=topic, partition_data=(
                                 m.PartitionProduceData(index=partition, records=records),)),))

        resp = self._leader_retried(send, _error_codes) if retry else send()
        p = resp.responses[0].partition_responses[0]
        return p if whole else (p.error_code, p.base_offset)

    def fetch(self, topic: str, partition: int, offset: int, max_wait_ms: int = 0, min_bytes: int = 1,
              max_bytes: int = 1 << 20, isolation: int = 0):
        m = self.mod("fetch", 12, "request")
        resp = self._leader_retried(
            lambda: self.call("fetch", 12, replica_id=-1, max_wait=timedelta(milliseconds=max_wait_ms),
                              min_bytes=min_bytes, max_bytes=max_bytes, isolation_level=isolation,
                              session_id=0, session_epoch=-1,
                              topics=(m.FetchTopic(topic=topic, partitions=(
                                  m.FetchPartition(partition=partition, fetch_offset=offset,
                                                   partition_max_bytes=max_bytes),)),),
                              forgotten_topics_data=(), rack_id=""),
            _error_codes)
        return resp.responses[0].partitions[0]

    def init_pid(self, txn_id: str | None = None, timeout_ms: int = 60000):
        def init():
            fields = dict(transactional_id=txn_id, transaction_timeout=timedelta(milliseconds=timeout_ms),
                          producer_id=-1, producer_epoch=-1)
            if txn_id is None:  # an idempotent producer asks any broker, which may not be ready yet
                deadline = time.monotonic() + RETRY_FOR_S
                while True:
                    r = self.call("init_producer_id", 4, **fields)
                    if r.error_code not in COORDINATOR_RETRIABLE or time.monotonic() >= deadline:
                        return r
                    self.not_ready += 1
                    time.sleep(0.1)
            return self.txn(txn_id, "init_producer_id", 4, **fields)

        deadline = time.monotonic() + RETRY_FOR_S
        while True:  # an open transaction is aborted first: retry, as clients do
            r = init()
            if r.error_code != ErrorCode.concurrent_transactions or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        assert r.error_code == ErrorCode.none, r
        return r.producer_id, r.producer_epoch


@pytest.fixture
def raw(broker):
    c = RawClient(broker.bootstrap)
    yield c
    if broker.kind == "devbroker":
        # a deliberate difference (devbroker/README.md): devbroker is ready when it listens
        # and knows a topic's leader as soon as it exists, so nothing is ever retried there
        assert c.not_ready == 0, "devbroker answered 'not ready' (coordinator or leader)"
    c.close()


def test_idempotent_duplicate_is_acknowledged_with_original_offset_and_not_appended(raw, new_topic):
    t = new_topic()
    pid, epoch = raw.init_pid()
    b0 = make_batch(3, pid, epoch, 0)
    assert raw.produce(t, 0, b0) == (ErrorCode.none, 0)
    assert raw.produce(t, 0, make_batch(2, pid, epoch, 3)) == (ErrorCode.none, 3)
    assert raw.produce(t, 0, b0) == (ErrorCode.none, 0)  # retry of the first batch
    assert raw.fetch(t, 0, 0).high_watermark == 5


def test_out_of_order_sequence_and_stale_epoch_rejected(raw, new_topic):
    t = new_topic()
    pid, epoch = raw.init_pid()
    assert raw.produce(t, 0, make_batch(2, pid, epoch, 0))[0] == ErrorCode.none
    assert raw.produce(t, 0, make_batch(1, pid, epoch, 5))[0] == ErrorCode.out_of_order_sequence_number
    assert raw.produce(t, 0, make_batch(1, pid, epoch + 1, 0))[0] == ErrorCode.none
    assert raw.produce(t, 0, make_batch(1, pid, epoch, 2))[0] == ErrorCode.invalid_producer_epoch
    assert raw.fetch(t, 0, 0).high_watermark == 3


def test_corrupt_batch_rejected(raw, new_topic):
    t = new_topic()
    b = bytearray(make_batch(2))
    b[-2] ^= 0x55
    assert raw.produce(t, 0, bytes(b))[0] == ErrorCode.corrupt_message
    assert raw.fetch(t, 0, 0).high_watermark == 0


def test_transactional_produce_to_partition_not_in_txn_is_rejected(raw, new_topic):
    t = new_topic(partitions=2)
    pid, epoch = raw.init_pid("raw-txn-unadded")
    m = raw.mod("add_partitions_to_txn", 3, "request")
    r = raw.txn("raw-txn-unadded", "add_partitions_to_txn", 3, v3_and_below_transactional_id="raw-txn-unadded",
                v3_and_below_producer_id=pid, v3_and_below_producer_epoch=epoch,
                v3_and_below_topics=(m.AddPartitionsToTxnTopic(name=t, partitions=(0,)),))
    assert r.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code == ErrorCode.none
    ok = raw.produce(t, 0, make_batch(1, pid, epoch, 0, txn=True), txn_id="raw-txn-unadded")
    assert ok[0] == ErrorCode.none
    bad = raw.produce(t, 1, make_batch(1, pid, epoch, 0, txn=True), txn_id="raw-txn-unadded")
    assert bad[0] == ErrorCode.invalid_txn_state
    p = raw.fetch(t, 0, 0)
    assert p.high_watermark == 1 and p.last_stable_offset == 0


def test_fetch_long_poll_wakes_on_produce(raw, bootstrap, new_topic):
    t = new_topic()
    # the partition's leader answers (Kafka's brokers learn a new topic's leadership a moment
    # after CreateTopics returns): only then is the long poll's wait the broker's to time
    assert raw.fetch(t, 0, 0).error_code == ErrorCode.none

    def later():
        time.sleep(0.3)
        c = RawClient(bootstrap)
        c.produce(t, 0, make_batch(1))
        c.close()

    th = threading.Thread(target=later)
    th.start()
    t0 = time.monotonic()
    p = raw.fetch(t, 0, 0, max_wait_ms=5000, min_bytes=1)
    waited = time.monotonic() - t0
    th.join()
    assert p.records and p.high_watermark == 1
    assert 0.2 < waited < 3.0
    t0 = time.monotonic()
    p = raw.fetch(t, 0, 1, max_wait_ms=300, min_bytes=1)
    assert not p.records and time.monotonic() - t0 >= 0.25


def test_fetch_max_bytes_cuts_the_log_as_kafka_does(raw, new_topic):
    """Kafka's LogSegment.read: the log's bytes from the batch holding the fetch offset, at most
    max bytes of them (KIP-74: but the whole first batch of the response, however large), so
    the last batch may be cut short: "the server is allowed to return a partial message at the
    end of the message set. Clients should handle this case" (the protocol guide)."""
    t = new_topic()
    big = make_batch(5, size=100)
    assert raw.produce(t, 0, big) == (ErrorCode.none, 0)
    assert raw.produce(t, 0, make_batch(1)) == (ErrorCode.none, 5)
    log = raw.fetch(t, 0, 0).records  # both batches, as stored
    assert len(log) == len(big) + len(make_batch(1)) and log[8:len(big)] == big[8:]
    assert raw.fetch(t, 0, 0, max_bytes=50).records == log[:len(big)]  # one whole batch
    assert raw.fetch(t, 0, 0, max_bytes=len(big) + 10).records == log[:len(big) + 10]  # + partial
    assert raw.fetch(t, 0, 2).records == log  # from inside the first batch: from its start
    assert raw.fetch(t, 0, 5).records == log[len(big):]
    p = raw.fetch(t, 0, 99)  # an error partition carries no offsets
    assert (p.error_code, p.high_watermark, p.last_stable_offset, p.log_start_offset, p.records) == \
        (ErrorCode.offset_out_of_range, -1, -1, -1, b"")


def test_api_versions_unknown_version_answers_v0_with_error(raw):
    from kio.schema.api_versions.v0.response import ApiVersionsResponse

    data = struct.pack(">hhih", 18, 99, 7, 3) + b"raw" + b"\x00" * 4
    raw.sock.sendall(struct.pack(">i", len(data)) + data)
    size = struct.unpack(">i", raw._read(4))[0]
    frame = raw._read(size)
    assert struct.unpack_from(">i", frame, 0)[0] == 7
    resp, _ = entity_reader(ApiVersionsResponse)(frame, 4)
    assert resp.error_code == ErrorCode.unsupported_version
    # Kafka's ApiVersionsRequest.getErrorResponse: only ApiVersions' own range, to ask again with
    assert [(k.api_key, k.min_version) for k in resp.api_keys] == [(18, 0)]
    assert resp.api_keys[0].max_version >= 3


def test_offset_fetch_require_stable_reports_pending_txn_offsets(raw, broker, new_topic):
    t = new_topic()
    tid, group = "raw-txn-stable", "g-raw-stable"
    pid, epoch = raw.init_pid(tid)
    r = raw.txn(tid, "add_offsets_to_txn", 3, transactional_id=tid, producer_id=pid, producer_epoch=epoch,
                group_id=group)
    assert r.error_code == ErrorCode.none
    m = raw.mod("txn_offset_commit", 3, "request")
    r = raw.group(group, "txn_offset_commit", 3, transactional_id=tid, group_id=group, producer_id=pid,
                  producer_epoch=epoch, generation_id=-1, member_id="", group_instance_id=None,
                  topics=(m.TxnOffsetCommitRequestTopic(name=t, partitions=(
                      m.TxnOffsetCommitRequestPartition(partition_index=0, committed_offset=5,
                                                        committed_leader_epoch=-1,
                                                        committed_metadata=""),)),))
    assert r.topics[0].partitions[0].error_code == ErrorCode.none

    def offset_fetch(stable: bool):
        fm = raw.mod("offset_fetch", 7, "request")
        resp = raw.group(group, "offset_fetch", 7, group_id=group, require_stable=stable,
                         topics=(fm.OffsetFetchRequestTopic(name=t, partition_indexes=(0,)),))
        return resp.topics[0].partitions[0]

    assert offset_fetch(True).error_code == ErrorCode.unstable_offset_commit
    assert offset_fetch(False).committed_offset == -1  # not visible before commit
    def end(commit: bool):
        return until(lambda: raw.txn(tid, "end_txn", 3, transactional_id=tid, producer_id=pid,
                                     producer_epoch=epoch, committed=commit), not_concurrent)

    assert end(True).error_code == ErrorCode.none
    if broker.kind == "devbroker":  # completes the commit before answering (devbroker/README.md)
        assert offset_fetch(True).committed_offset == 5
    # Kafka writes the commit marker to __consumer_offsets after EndTxn answers: until then
    # the offsets stay pending (a require_stable client retries)
    p = until(lambda: offset_fetch(True), lambda p: p.error_code != ErrorCode.unstable_offset_commit,
              timeout=10)
    assert p.error_code == ErrorCode.none and p.committed_offset == 5
    # a second EndTxn with the same outcome is a harmless retry; the other outcome is not
    assert end(True).error_code == ErrorCode.none
    assert end(False).error_code == ErrorCode.invalid_txn_state


def test_session_timeout_evicts_a_silent_member(raw, bootstrap):
    # Kafka's group.min.session.timeout.ms (default 6000) refuses anything shorter.
    SESSION_MS = 6000
    group = f"g-raw-session-{time.time_ns()}"
    jm = raw.mod("join_group", 5, "request")
    proto = (jm.JoinGroupRequestProtocol(name="range", metadata=b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"),)

    def join(member_id=""):
        return raw.group(group, "join_group", 5, group_id=group, session_timeout=timedelta(milliseconds=SESSION_MS),
                         rebalance_timeout=timedelta(milliseconds=2000), member_id=member_id,
                         group_instance_id=None, protocol_type="consumer", protocols=proto)

    r = join()
    assert r.error_code == ErrorCode.member_id_required
    r = join(r.member_id)
    assert r.error_code == ErrorCode.none and r.leader == r.member_id and r.generation_id == 1
    member = r.member_id
    s = raw.group(group, "sync_group", 3, group_id=group, generation_id=1, member_id=member, group_instance_id=None,
                  assignments=())
    assert s.error_code == ErrorCode.none
    h = raw.group(group, "heartbeat", 3, group_id=group, generation_id=1, member_id=member, group_instance_id=None)
    assert h.error_code == ErrorCode.none
    h = raw.group(group, "heartbeat", 3, group_id=group, generation_id=0, member_id=member, group_instance_id=None)
    assert h.error_code == ErrorCode.illegal_generation
    silent_since = time.monotonic()
    # DescribeGroups does not touch the member's session (a heartbeat would renew it).
    deadline = silent_since + SESSION_MS / 1000 + 10
    while True:
        d = raw.group(group, "describe_groups", 5, groups=(group,), include_authorized_operations=False)
        if d.groups[0].group_state == "Empty" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert d.groups[0].group_state == "Empty" and d.groups[0].members == ()
    assert time.monotonic() - silent_since >= SESSION_MS / 1000 - 1.0, "evicted before its session timed out"
    h = raw.group(group, "heartbeat", 3, group_id=group, generation_id=1, member_id=member, group_instance_id=None)
    assert h.error_code == ErrorCode.unknown_member_id


def _join_static(raw, group, instance, member_id=""):
    jm = raw.mod("join_group", 5, "request")
    proto = (jm.JoinGroupRequestProtocol(name="range", metadata=b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"),)
    return raw.group(group, "join_group", 5, group_id=group, session_timeout=timedelta(seconds=10),
                     rebalance_timeout=timedelta(seconds=10), member_id=member_id,
                     group_instance_id=instance, protocol_type="consumer", protocols=proto)


def test_static_member_replaced_fences_old_member_id(raw):
    group = f"g-raw-static-{time.time_ns()}"
    r1 = _join_static(raw, group, "inst-1")
    assert r1.error_code == ErrorCode.none and r1.generation_id == 1
    s = raw.group(group, "sync_group", 3, group_id=group, generation_id=1, member_id=r1.member_id,
                  group_instance_id="inst-1", assignments=((raw.mod("sync_group", 3, "request")
                                                            .SyncGroupRequestAssignment(member_id=r1.member_id,
                                                                                        assignment=b"A")),))
    assert s.error_code == ErrorCode.none and s.assignment == b"A"
    # the same instance restarts: new member id, same generation, no rebalance, old assignment
    r2 = _join_static(raw, group, "inst-1")
    assert r2.error_code == ErrorCode.none and r2.generation_id == 1 and r2.member_id != r1.member_id
    s2 = raw.group(group, "sync_group", 3, group_id=group, generation_id=1, member_id=r2.member_id,
                   group_instance_id="inst-1", assignments=())
    assert s2.error_code == ErrorCode.none and s2.assignment == b"A"
    h = raw.group(group, "heartbeat", 3, group_id=group, generation_id=1, member_id=r1.member_id,
                  group_instance_id="inst-1")
    assert h.error_code == ErrorCode.fenced_instance_id


def test_txn_offset_commit_checks_group_generation_and_member(raw, new_topic):
    t = new_topic()
    group = f"g-raw-447-{time.time_ns()}"
    r = _join_static(raw, group, None)
    assert r.error_code == ErrorCode.member_id_required
    r = _join_static(raw, group, None, r.member_id)
    assert r.error_code == ErrorCode.none
    raw.group(group, "sync_group", 3, group_id=group, generation_id=r.generation_id, member_id=r.member_id,
              group_instance_id=None, assignments=())
    tid = f"raw-447-{time.time_ns()}"
    pid, epoch = raw.init_pid(tid)
    raw.txn(tid, "add_offsets_to_txn", 3, transactional_id=tid, producer_id=pid, producer_epoch=epoch,
            group_id=group)
    m = raw.mod("txn_offset_commit", 3, "request")

    def commit(gen, member):
        resp = raw.group(group, "txn_offset_commit", 3, transactional_id=tid, group_id=group, producer_id=pid,
                         producer_epoch=epoch, generation_id=gen, member_id=member, group_instance_id=None,
                         topics=(m.TxnOffsetCommitRequestTopic(name=t, partitions=(
                             m.TxnOffsetCommitRequestPartition(partition_index=0, committed_offset=1,
                                                               committed_leader_epoch=-1,
                                                               committed_metadata=""),)),))
        return resp.topics[0].partitions[0].error_code

    assert commit(r.generation_id + 5, r.member_id) == ErrorCode.illegal_generation
    assert commit(r.generation_id, "nobody") == ErrorCode.unknown_member_id
    assert commit(r.generation_id, r.member_id) == ErrorCode.none
    # a stale epoch after a re-init is refused as Kafka's partition leader refuses a stale
    # transactional write: INVALID_PRODUCER_EPOCH (PRODUCER_FENCED is the coordinator's word)
    raw.init_pid(tid)
    assert commit(r.generation_id, r.member_id) == ErrorCode.invalid_producer_epoch


def test_init_producer_id_retry_path_does_not_unfence_an_older_instance(raw, new_topic):
    """Kafka clears lastProducerEpoch when a new instance (no pid given) or a timeout bumps the
    epoch: an older instance asking for a KIP-360 bump with its old epoch is PRODUCER_FENCED,
    it must not be handed the new instance's epoch."""
    tid = f"tx-{new_topic()}"

    def init(pid: int, epoch: int):
        return raw.txn(tid, "init_producer_id", 4, transactional_id=tid,
                       transaction_timeout=timedelta(milliseconds=60000),
                       producer_id=pid, producer_epoch=epoch)

    first = init(-1, -1)
    second = init(-1, -1)  # a new instance fences the first
    assert second.error_code == ErrorCode.none and second.producer_epoch == first.producer_epoch + 1
    zombie = init(first.producer_id, first.producer_epoch)
    assert zombie.error_code == ErrorCode.producer_fenced, zombie
    # the current instance may bump its own epoch, and retry that bump (lost answer)
    bumped = init(second.producer_id, second.producer_epoch)
    assert bumped.error_code == ErrorCode.none and bumped.producer_epoch == second.producer_epoch + 1
    retry = init(second.producer_id, second.producer_epoch)
    assert retry.error_code == ErrorCode.none and retry.producer_epoch == bumped.producer_epoch


def test_offset_commit_validation_follows_kafka_order(raw, new_topic):
    """GroupCoordinator.validateOffsetCommit: a commit naming a member but no generation is
    ILLEGAL_GENERATION, a generation for a group the coordinator does not know is
    ILLEGAL_GENERATION, and a simple (no member) commit to an empty group is accepted."""
    t = new_topic()
    m = raw.mod("offset_commit", 8, "request")

    def commit(group, gen, member):
        resp = raw.group(group, "offset_commit", 8, group_id=group, generation_id_or_member_epoch=gen,
                         member_id=member, group_instance_id=None,
                         topics=(m.OffsetCommitRequestTopic(name=t, partitions=(
                             m.OffsetCommitRequestPartition(partition_index=0, committed_offset=1,
                                                            committed_leader_epoch=-1,
                                                            committed_metadata=""),)),))
        return resp.topics[0].partitions[0].error_code

    assert commit(f"g-raw-none-{time.time_ns()}", 3, "ghost") == ErrorCode.illegal_generation
    assert commit(f"g-raw-simple-{time.time_ns()}", -1, "") == ErrorCode.none
    group = f"g-raw-commit-{time.time_ns()}"
    r = _join_static(raw, group, None)
    r = _join_static(raw, group, None, r.member_id)
    assert r.error_code == ErrorCode.none
    assert commit(group, r.generation_id, r.member_id) == ErrorCode.rebalance_in_progress  # awaiting sync
    raw.group(group, "sync_group", 3, group_id=group, generation_id=r.generation_id, member_id=r.member_id,
              group_instance_id=None, assignments=())
    assert commit(group, -1, r.member_id) == ErrorCode.illegal_generation
    assert commit(group, -1, "") == ErrorCode.unknown_member_id  # not empty: members only
    assert commit(group, r.generation_id - 1, r.member_id) == ErrorCode.illegal_generation
    assert commit(group, r.generation_id, r.member_id) == ErrorCode.none


def _init(raw, tid: str, pid: int = -1, epoch: int = -1, timeout_ms: int = 60000):
    return raw.txn(tid, "init_producer_id", 4, transactional_id=tid,
                   transaction_timeout=timedelta(milliseconds=timeout_ms), producer_id=pid,
                   producer_epoch=epoch)


def _add_partition(raw, tid: str, pid: int, epoch: int, topic: str) -> ErrorCode:
    m = raw.mod("add_partitions_to_txn", 3, "request")
    r = raw.txn(tid, "add_partitions_to_txn", 3, v3_and_below_transactional_id=tid,
                v3_and_below_producer_id=pid, v3_and_below_producer_epoch=epoch,
                v3_and_below_topics=(m.AddPartitionsToTxnTopic(name=topic, partitions=(0,)),))
    return r.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code


def _end(raw, tid: str, pid: int, epoch: int, commit: bool) -> ErrorCode:
    return until(lambda: raw.txn(tid, "end_txn", 3, transactional_id=tid, producer_id=pid,
                                 producer_epoch=epoch, committed=commit), not_concurrent).error_code


def _await_lso(raw, topic: str, lso: int, timeout: float = 10.0) -> int:
    """The read_committed LSO once it reaches `lso`: Kafka writes an abort's markers after it
    answers (asynchronously), devbroker before (see devbroker/README.md)."""
    return until(lambda: raw.fetch(topic, 0, 0, isolation=1), lambda p: p.last_stable_offset >= lso,
                 timeout=timeout).last_stable_offset


def test_init_producer_id_on_an_ongoing_transaction_aborts_it_then_asks_for_a_retry(raw, broker, new_topic):
    """Kafka fences an ongoing transaction's producer (abort with a bumped epoch) and answers
    CONCURRENT_TRANSACTIONS. At transaction.version 2 (Kafka 4's level for a new cluster,
    whatever request versions the client speaks) the abort keeps the producer's epoch as the
    last epoch: the producer's own KIP-360 retry gets the fencing epoch, until a new instance
    bumps it again and fences it for good."""
    t = new_topic()
    tid = f"tx-ongoing-{t}"
    first = _init(raw, tid)
    pid, epoch = first.producer_id, first.producer_epoch
    assert _add_partition(raw, tid, pid, epoch, t) == ErrorCode.none
    assert raw.produce(t, 0, make_batch(2, pid=pid, epoch=epoch, seq=0, txn=True), txn_id=tid)[0] == ErrorCode.none
    bump = _init(raw, tid, pid, epoch)  # the producer itself asks for a bump while its transaction is open
    assert bump.error_code == ErrorCode.concurrent_transactions
    if broker.kind == "devbroker":  # writes the markers before answering (devbroker/README.md)
        assert raw.fetch(t, 0, 0, isolation=1).last_stable_offset == 3
    assert _await_lso(raw, t, 3) == 3  # aborted: records + marker
    retry = until(lambda: _init(raw, tid, pid, epoch), not_concurrent)
    assert retry.error_code == ErrorCode.none and (retry.producer_id, retry.producer_epoch) == (pid, epoch + 1)
    again = _init(raw, tid, pid, epoch)  # a lost answer retried: the same epoch, no new bump
    assert again.error_code == ErrorCode.none and again.producer_epoch == epoch + 1
    # the old epoch stays fenced where it writes
    assert raw.produce(t, 0, make_batch(1, pid=pid, epoch=epoch, seq=2, txn=True), txn_id=tid)[0] == \
        ErrorCode.invalid_producer_epoch
    assert _add_partition(raw, tid, pid, epoch, t) == ErrorCode.producer_fenced
    successor = _init(raw, tid)  # a new instance
    assert successor.error_code == ErrorCode.none and successor.producer_epoch == epoch + 2
    assert _init(raw, tid, pid, epoch + 1).error_code == ErrorCode.producer_fenced
    assert _init(raw, tid, pid, epoch).error_code == ErrorCode.producer_fenced


def test_init_producer_id_with_the_id_and_a_stale_epoch_aborts_the_ongoing_transaction(raw, new_topic):
    """Kafka's prepareInitProducerIdTransit checks only the producer id while a transaction is
    ongoing: an older instance giving the id and its stale epoch fences the current producer
    (its transaction is aborted, it is PRODUCER_FENCED at EndTxn) and gets
    CONCURRENT_TRANSACTIONS; its retry is then PRODUCER_FENCED, while the current producer may
    take the fencing epoch (KIP-360)."""
    t = new_topic()
    tid = f"tx-zombie-{t}"
    old = _init(raw, tid)
    cur = _init(raw, tid)
    pid, epoch = cur.producer_id, cur.producer_epoch
    assert (pid, epoch) == (old.producer_id, old.producer_epoch + 1)
    assert _add_partition(raw, tid, pid, epoch, t) == ErrorCode.none
    assert raw.produce(t, 0, make_batch(1, pid=pid, epoch=epoch, seq=0, txn=True), txn_id=tid)[0] == ErrorCode.none
    assert _init(raw, tid, pid, old.producer_epoch).error_code == ErrorCode.concurrent_transactions
    assert _await_lso(raw, t, 2) == 2  # the current producer's record, aborted, and the marker
    assert _end(raw, tid, pid, epoch, commit=True) == ErrorCode.producer_fenced
    assert until(lambda: _init(raw, tid, pid, old.producer_epoch), not_concurrent).error_code == \
        ErrorCode.producer_fenced
    back = _init(raw, tid, pid, epoch)
    assert back.error_code == ErrorCode.none and back.producer_epoch == epoch + 1
    assert raw.fetch(t, 0, 0, isolation=1).aborted_transactions[0].producer_id == pid


def test_idempotent_init_producer_id_always_gives_a_new_producer_id(raw):
    """Kafka's handleInitProducerId without a transactional id ignores the id and epoch given:
    a new producer id at epoch 0 (an idempotent producer bumps its epoch on its own)."""
    pid, epoch = raw.init_pid()
    r = raw.call("init_producer_id", 4, transactional_id=None,
                 transaction_timeout=timedelta(milliseconds=60000), producer_id=pid, producer_epoch=epoch)
    assert r.error_code == ErrorCode.none and r.producer_id != pid and r.producer_epoch == 0


def test_timed_out_transaction_is_aborted_and_its_producer_may_take_the_bumped_epoch(raw, broker, new_topic):
    """A transaction older than its transaction.timeout.ms is aborted with an epoch bump. The
    producer's old epoch is then fenced everywhere: INVALID_PRODUCER_EPOCH where it writes (its
    partitions, TxnOffsetCommit to __consumer_offsets), PRODUCER_FENCED at the transaction
    coordinator. At transaction.version 2 (Kafka 4) the abort keeps its epoch as the last
    epoch, so InitProducerId(its id, its epoch) gives it the bumped epoch (KIP-360) and it goes
    on, until a new instance bumps the epoch again."""
    t = new_topic()
    tid, group = f"tx-timeout-{t}", f"g-timeout-{t}"
    timeout_s = 3  # long enough for the set-up below on a loaded machine
    first = _init(raw, tid, timeout_ms=timeout_s * 1000)
    pid, epoch = first.producer_id, first.producer_epoch
    assert _add_partition(raw, tid, pid, epoch, t) == ErrorCode.none
    assert raw.produce(t, 0, make_batch(1, pid=pid, epoch=epoch, seq=0, txn=True), txn_id=tid)[0] == ErrorCode.none
    r = raw.txn(tid, "add_offsets_to_txn", 3, transactional_id=tid, producer_id=pid, producer_epoch=epoch,
                group_id=group)
    assert r.error_code == ErrorCode.none
    tm = raw.mod("txn_offset_commit", 3, "request")

    def offset_commit(ep: int) -> ErrorCode:
        resp = raw.group(group, "txn_offset_commit", 3, transactional_id=tid, group_id=group, producer_id=pid,
                         producer_epoch=ep, generation_id=-1, member_id="", group_instance_id=None,
                         topics=(tm.TxnOffsetCommitRequestTopic(name=t, partitions=(
                             tm.TxnOffsetCommitRequestPartition(partition_index=0, committed_offset=1,
                                                                committed_leader_epoch=-1,
                                                                committed_metadata=""),)),))
        return resp.topics[0].partitions[0].error_code

    assert offset_commit(epoch) == ErrorCode.none
    began = time.monotonic()
    # Kafka looks for timed-out transactions every 10 s
    # (transaction.abort.timed.out.transaction.cleanup.interval.ms), devbroker every 50 ms
    assert _await_lso(raw, t, 2, timeout=timeout_s + 10 + 10) == 2  # the record, aborted, and its marker
    if broker.kind == "devbroker":  # a deliberate difference: devbroker/README.md
        assert time.monotonic() - began < timeout_s + 2.0
    assert raw.produce(t, 0, make_batch(1, pid=pid, epoch=epoch, seq=1, txn=True), txn_id=tid)[0] == \
        ErrorCode.invalid_producer_epoch
    assert offset_commit(epoch) == ErrorCode.invalid_producer_epoch
    assert _add_partition(raw, tid, pid, epoch, t) == ErrorCode.producer_fenced
    assert _end(raw, tid, pid, epoch, commit=True) == ErrorCode.producer_fenced
    back = until(lambda: _init(raw, tid, pid, epoch), not_concurrent)
    assert back.error_code == ErrorCode.none and (back.producer_id, back.producer_epoch) == (pid, epoch + 1)
    ep = back.producer_epoch
    assert _add_partition(raw, tid, pid, ep, t) == ErrorCode.none
    assert raw.produce(t, 0, make_batch(1, pid=pid, epoch=ep, seq=0, txn=True), txn_id=tid)[0] == ErrorCode.none
    assert _end(raw, tid, pid, ep, commit=True) == ErrorCode.none
    assert _await_lso(raw, t, 4) == 4
    # Kafka may still be completing the commit (markers written, state to CompleteCommit).
    successor = until(lambda: _init(raw, tid), not_concurrent)
    assert successor.error_code == ErrorCode.none and successor.producer_epoch == ep + 1
    assert _init(raw, tid, pid, epoch).error_code == ErrorCode.producer_fenced


def _metadata_error(raw, topic: str) -> ErrorCode:
    m = raw.mod("metadata", 12, "request")
    r = raw.call("metadata", 12, topics=(m.MetadataRequestTopic(topic_id=None, name=topic),),
                 allow_auto_topic_creation=False, include_topic_authorized_operations=False)
    return r.topics[0].error_code


def test_produce_creates_no_topic_and_takes_exactly_one_batch_per_partition(raw, new_topic):
    """Kafka creates topics on Metadata only (auto.create.topics.enable), never on Produce;
    and from Produce v3 each partition's records must be exactly one record batch
    (ProduceRequest.validateRecords: INVALID_RECORD). A failed partition's log start offset
    is -1."""
    t = new_topic()
    ghost = f"never-created-{t}"
    p = raw.produce(ghost, 0, make_batch(1), retry=False, whole=True)
    assert (p.error_code, p.base_offset, p.log_start_offset) == (ErrorCode.unknown_topic_or_partition, -1, -1)
    # a topic created after the produce and visible in the metadata: a creation the produce had
    # set off would be visible by now too (the controller applies them in order)
    new_topic()
    assert _metadata_error(raw, ghost) == ErrorCode.unknown_topic_or_partition
    p = raw.produce(t, 0, make_batch(1) + make_batch(2), whole=True)
    assert (p.error_code, p.base_offset, p.log_start_offset) == (ErrorCode.invalid_record, -1, -1)
    assert raw.produce(t, 0, b"")[0] == ErrorCode.invalid_record
    p = raw.produce(t, 0, make_batch(2), whole=True)
    assert (p.error_code, p.base_offset, p.log_start_offset) == (ErrorCode.none, 0, 0)
    assert raw.fetch(t, 0, 0).high_watermark == 2


def test_transactional_produce_needs_its_transactional_ids_producer_id(raw, new_topic):
    """Kafka verifies a transactional write with the coordinator of the request's
    transactional id: an unknown id, or a producer id that is not that id's, is
    INVALID_PRODUCER_ID_MAPPING (a known pair whose partition was not added is
    INVALID_TXN_STATE: test_transactional_produce_to_partition_not_in_txn_is_rejected)."""
    t = new_topic()
    tid = f"tx-mapping-{t}"
    pid, epoch = raw.init_pid(tid)
    assert _add_partition(raw, tid, pid, epoch, t) == ErrorCode.none
    batch = make_batch(1, pid, epoch, 0, txn=True)
    assert raw.produce(t, 0, batch, txn_id=f"other-{t}")[0] == ErrorCode.invalid_producer_id_mapping
    assert raw.produce(t, 0, make_batch(1, pid + 1000, 0, 0, txn=True), txn_id=tid)[0] == \
        ErrorCode.invalid_producer_id_mapping
    assert raw.produce(t, 0, batch, txn_id=tid) == (ErrorCode.none, 0)


def test_leave_group_of_an_unknown_group_fails_each_member_only(raw):
    """Kafka answers LeaveGroup (v3+) for a group it does not know with no group-level error
    and UNKNOWN_MEMBER_ID for each member."""
    group = f"g-raw-unknown-{time.time_ns()}"
    lm = raw.mod("leave_group", 4, "request")
    r = raw.group(group, "leave_group", 4, group_id=group,
                  members=(lm.MemberIdentity(member_id="ghost", group_instance_id=None),))
    assert r.error_code == ErrorCode.none
    assert [(m.member_id, m.error_code) for m in r.members] == [("ghost", ErrorCode.unknown_member_id)]


def test_list_offsets_without_a_match_answers_minus_one_everywhere(raw, new_topic):
    """ListOffsets by timestamp (or max timestamp on an empty partition) with no record to
    give: offset, timestamp and leader epoch -1, as Kafka answers."""
    t = new_topic()
    lo = raw.mod("list_offsets", 7, "request")

    def lookup(ts: int):
        r = raw.call("list_offsets", 7, replica_id=-1, isolation_level=0,
                     topics=(lo.ListOffsetsTopic(name=t, partitions=(
                         lo.ListOffsetsPartition(partition_index=0, current_leader_epoch=-1, timestamp=ts),)),))
        p = r.topics[0].partitions[0]
        return p.error_code, p.offset, p.timestamp, p.leader_epoch

    assert lookup(-3) == (ErrorCode.none, -1, -1, -1)  # max timestamp, empty partition
    assert raw.produce(t, 0, make_batch(1)) == (ErrorCode.none, 0)
    assert lookup(int(time.time() * 1000) + 3_600_000) == (ErrorCode.none, -1, -1, -1)
    assert lookup(0)[:2] == (ErrorCode.none, 0)
    assert lookup(-1) == (ErrorCode.none, 1, -1, 0)


def test_create_topics_validates_configs_and_validate_only_answers_the_topic(raw, new_topic):
    """Kafka's CreateTopics checks each config against LogConfig (unknown name, null, type,
    range, choices: INVALID_CONFIG), and with validate_only answers the partitions the topic
    would have without creating it."""
    ct = raw.mod("create_topics", 7, "request")

    def create(configs: dict, partitions: int = 2, validate_only: bool = False):
        name = f"cfg-{time.time_ns()}"
        r = raw.call("create_topics", 7, topics=(ct.CreatableTopic(
            name=name, num_partitions=partitions, replication_factor=-1, assignments=(),
            configs=tuple(ct.CreatableTopicConfig(name=k, value=v) for k, v in configs.items())),),
            timeout=timedelta(seconds=10), validate_only=validate_only)
        return name, r.topics[0]

    for bad in ({"no.such.config": "1"}, {"retention.ms": None}, {"max.message.bytes": "abc"},
                {"segment.bytes": "100"}, {"min.insync.replicas": "0"}, {"preallocate": "yes"},
                {"compression.type": "none"}, {"cleanup.policy": "delete,forever"},
                {"message.timestamp.type": "createtime"}, {"min.cleanable.dirty.ratio": "1.5"}):
        name, r = create(bad)
        assert (r.error_code, r.num_partitions) == (ErrorCode.invalid_config, -1), bad
        assert _metadata_error(raw, name) == ErrorCode.unknown_topic_or_partition
    name, r = create({"cleanup.policy": "compact,delete", "compression.type": "lz4",
                      "max.message.bytes": "2000000"}, validate_only=True)
    assert (r.error_code, r.num_partitions, r.replication_factor) == (ErrorCode.none, 2, 1)
    new_topic()  # created later and visible: a validate-only creation that went through would be too
    assert _metadata_error(raw, name) == ErrorCode.unknown_topic_or_partition


def test_an_emptied_group_keeps_its_protocol_type_a_committed_only_group_has_none(raw, new_topic):
    """Kafka keeps the protocol type of a group whose members all left (Empty, "consumer"),
    while a group that only ever had offsets committed (no member) has none ("")."""
    t = new_topic()
    group = f"g-raw-emptied-{time.time_ns()}"
    r = _join_static(raw, group, None)
    r = _join_static(raw, group, None, r.member_id)
    assert r.error_code == ErrorCode.none
    assert raw.group(group, "sync_group", 3, group_id=group, generation_id=r.generation_id, member_id=r.member_id,
                     group_instance_id=None, assignments=()).error_code == ErrorCode.none
    lm = raw.mod("leave_group", 4, "request")
    left = raw.group(group, "leave_group", 4, group_id=group,
                     members=(lm.MemberIdentity(member_id=r.member_id, group_instance_id=None),))
    assert [m.error_code for m in left.members] == [ErrorCode.none]
    simple = f"g-raw-simple-only-{time.time_ns()}"
    om = raw.mod("offset_commit", 8, "request")
    c = raw.group(simple, "offset_commit", 8, group_id=simple, generation_id_or_member_epoch=-1, member_id="",
                  group_instance_id=None, topics=(om.OffsetCommitRequestTopic(name=t, partitions=(
                      om.OffsetCommitRequestPartition(partition_index=0, committed_offset=1,
                                                      committed_leader_epoch=-1, committed_metadata=""),)),))
    assert c.topics[0].partitions[0].error_code == ErrorCode.none

    def described(g):
        d = raw.group(g, "describe_groups", 5, groups=(g,), include_authorized_operations=False).groups[0]
        return d.error_code, d.group_state, d.protocol_type, d.protocol_data, d.members

    assert described(group) == (ErrorCode.none, "Empty", "consumer", "", ())
    assert described(simple) == (ErrorCode.none, "Empty", "", "", ())
    listed = {x.group_id: (x.protocol_type, x.group_state)
              for x in raw.call("list_groups", 4, states_filter=()).groups}
    assert listed[group] == ("consumer", "Empty") and listed[simple] == ("", "Empty")


def test_list_offsets_by_timestamp_read_committed_stops_at_the_lso(raw, new_topic):
    """Kafka's fetchOffsetForTimestamp answers only offsets below the last fetchable offset:
    for read_committed a record at or after the LSO (held by an open transaction) is not
    found (-1), by timestamp or max timestamp, while read_uncommitted finds it."""
    t = new_topic()
    lo = raw.mod("list_offsets", 7, "request")

    def lookup(ts: int, isolation: int):
        r = raw.call("list_offsets", 7, replica_id=-1, isolation_level=isolation,
                     topics=(lo.ListOffsetsTopic(name=t, partitions=(
                         lo.ListOffsetsPartition(partition_index=0, current_leader_epoch=-1, timestamp=ts),)),))
        p = r.topics[0].partitions[0]
        return p.error_code, p.offset

    before = int(time.time() * 1000) - 1000
    assert raw.produce(t, 0, make_batch(1)) == (ErrorCode.none, 0)
    tid = f"tx-lookup-{t}"
    pid, epoch = raw.init_pid(tid)
    assert _add_partition(raw, tid, pid, epoch, t) == ErrorCode.none
    time.sleep(0.02)
    in_txn = int(time.time() * 1000)  # after record 0's timestamp, at most record 1's
    assert raw.produce(t, 0, make_batch(1, pid, epoch, 0, txn=True), txn_id=tid) == (ErrorCode.none, 1)
    time.sleep(0.02)  # record 2 alone holds the largest timestamp
    assert raw.produce(t, 0, make_batch(1)) == (ErrorCode.none, 2)
    after_first = int(time.time() * 1000) + 1  # no record is this late: none but by max timestamp
    assert lookup(before, 1) == (ErrorCode.none, 0)
    assert lookup(in_txn, 0) == (ErrorCode.none, 1) and lookup(in_txn, 1) == (ErrorCode.none, -1)
    assert lookup(-3, 0) == (ErrorCode.none, 2) and lookup(-3, 1) == (ErrorCode.none, -1)
    assert lookup(after_first, 0) == lookup(after_first, 1) == (ErrorCode.none, -1)
    assert lookup(-1, 1) == (ErrorCode.none, 1) and lookup(-1, 0) == (ErrorCode.none, 3)
    assert _end(raw, tid, pid, epoch, commit=True) == ErrorCode.none
    until(lambda: lookup(-1, 1), lambda r: r[1] == 4, timeout=10)
    assert lookup(-3, 1)[1] >= 2  # committed: found (the marker may hold the largest timestamp)


def test_heartbeat_and_sync_know_a_static_member_by_its_instance_id(raw):
    """Kafka's ClassicGroup.validateMember: with a group instance id, the id must be mapped
    (else UNKNOWN_MEMBER_ID) to the member id given (else FENCED_INSTANCE_ID), also when the
    member id itself is a member's."""
    group = f"g-raw-validate-{time.time_ns()}"
    a = _join_static(raw, group, "inst-a")
    assert a.error_code == ErrorCode.none
    assert raw.group(group, "sync_group", 3, group_id=group, generation_id=a.generation_id, member_id=a.member_id,
                     group_instance_id="inst-a", assignments=()).error_code == ErrorCode.none

    def heartbeat(member, instance):
        return raw.group(group, "heartbeat", 3, group_id=group, generation_id=a.generation_id, member_id=member,
                         group_instance_id=instance).error_code

    def sync(member, instance):
        return raw.group(group, "sync_group", 3, group_id=group, generation_id=a.generation_id, member_id=member,
                         group_instance_id=instance, assignments=()).error_code

    assert heartbeat(a.member_id, "inst-a") == ErrorCode.none
    assert heartbeat(a.member_id, None) == ErrorCode.none
    assert heartbeat(a.member_id, "inst-unknown") == ErrorCode.unknown_member_id
    assert sync(a.member_id, "inst-unknown") == ErrorCode.unknown_member_id
    assert heartbeat("someone-else", "inst-a") == ErrorCode.fenced_instance_id
    assert sync("someone-else", "inst-a") == ErrorCode.fenced_instance_id


def test_offset_commits_answer_unknown_partitions_first_and_refuse_oversized_metadata(raw, new_topic):
    """Kafka answers UNKNOWN_TOPIC_OR_PARTITION for a partition that does not exist before the
    coordinator looks at the member (KafkaApis filters them), and OFFSET_METADATA_TOO_LARGE
    for metadata over offset.metadata.max.bytes (4096), in OffsetCommit and TxnOffsetCommit."""
    t = new_topic()
    group = f"g-raw-meta-{time.time_ns()}"
    om = raw.mod("offset_commit", 8, "request")

    def commit(gen: int, parts: list[tuple[str, int, str]]):
        by_topic: dict[str, list] = {}
        for topic, part, meta in parts:
            by_topic.setdefault(topic, []).append(om.OffsetCommitRequestPartition(
                partition_index=part, committed_offset=1, committed_leader_epoch=-1, committed_metadata=meta))
        r = raw.group(group, "offset_commit", 8, group_id=group, generation_id_or_member_epoch=gen,
                      member_id="", group_instance_id=None,
                      topics=tuple(om.OffsetCommitRequestTopic(name=k, partitions=tuple(v))
                                   for k, v in by_topic.items()))
        return {(x.name, p.partition_index): p.error_code for x in r.topics for p in x.partitions}

    ghost = f"ghost-{t}"
    assert commit(-1, [(t, 0, "m" * 4096), (t, 1, ""), (ghost, 0, "")]) == {
        (t, 0): ErrorCode.none, (t, 1): ErrorCode.unknown_topic_or_partition,
        (ghost, 0): ErrorCode.unknown_topic_or_partition}
    assert commit(-1, [(t, 0, "m" * 4097)]) == {(t, 0): ErrorCode.offset_metadata_too_large}
    # the group the first commit made (a simple group, no member) knows no member; the
    # partition check comes first
    assert commit(7, [(t, 0, ""), (ghost, 0, "")]) == {
        (t, 0): ErrorCode.unknown_member_id, (ghost, 0): ErrorCode.unknown_topic_or_partition}

    tid = f"tx-meta-{t}"
    pid, epoch = raw.init_pid(tid)
    assert raw.txn(tid, "add_offsets_to_txn", 3, transactional_id=tid, producer_id=pid, producer_epoch=epoch,
                   group_id=group).error_code == ErrorCode.none
    tm = raw.mod("txn_offset_commit", 3, "request")

    def txn_commit(parts: list[tuple[str, int, str]]):
        by_topic: dict[str, list] = {}
        for topic, part, meta in parts:
            by_topic.setdefault(topic, []).append(tm.TxnOffsetCommitRequestPartition(
                partition_index=part, committed_offset=2, committed_leader_epoch=-1, committed_metadata=meta))
        r = raw.group(group, "txn_offset_commit", 3, transactional_id=tid, group_id=group, producer_id=pid,
                      producer_epoch=epoch, generation_id=-1, member_id="", group_instance_id=None,
                      topics=tuple(tm.TxnOffsetCommitRequestTopic(name=k, partitions=tuple(v))
                                   for k, v in by_topic.items()))
        return {(x.name, p.partition_index): p.error_code for x in r.topics for p in x.partitions}

    assert txn_commit([(t, 0, "m" * 4097), (ghost, 0, "")]) == {
        (t, 0): ErrorCode.offset_metadata_too_large, (ghost, 0): ErrorCode.unknown_topic_or_partition}
    assert txn_commit([(t, 0, "ok")]) == {(t, 0): ErrorCode.none}
    assert _end(raw, tid, pid, epoch, commit=True) == ErrorCode.none


KAFKA_TOPIC_CONFIGS = {
    "cleanup.policy", "compression.gzip.level", "compression.lz4.level", "compression.type",
    "compression.zstd.level", "delete.retention.ms", "file.delete.delay.ms", "flush.messages", "flush.ms",
    "follower.replication.throttled.replicas", "index.interval.bytes", "leader.replication.throttled.replicas",
    "local.retention.bytes", "local.retention.ms", "max.compaction.lag.ms", "max.message.bytes",
    "message.timestamp.after.max.ms", "message.timestamp.before.max.ms", "message.timestamp.type",
    "min.cleanable.dirty.ratio", "min.compaction.lag.ms", "min.insync.replicas", "preallocate",
    "remote.log.copy.disable", "remote.log.delete.on.disable", "remote.storage.enable", "retention.bytes",
    "retention.ms", "segment.bytes", "segment.index.bytes", "segment.jitter.ms", "segment.ms",
    "unclean.leader.election.enable"}


def test_describe_configs_lists_every_topic_config_and_only_this_brokers_configs(raw, new_topic):
    """Kafka 4.1 describes every topic config (its defaults, DEFAULT_CONFIG, and what the topic
    set, DYNAMIC_TOPIC_CONFIG); a broker's configs only for its own id (another id:
    INVALID_REQUEST), marking the ones it cannot update dynamically read-only."""
    t = new_topic(config={"retention.ms": "1000"})
    dm = raw.mod("describe_configs", 4, "request")

    def describe(rtype: int, name: str, keys=None):
        r = raw.call("describe_configs", 4, resources=(dm.DescribeConfigsResource(
            resource_type=rtype, resource_name=name, configuration_keys=keys),),
            include_synonyms=False, include_documentation=False)
        return r.results[0].error_code, {c.name: c for c in r.results[0].configs}

    code, configs = describe(2, t)
    assert code == ErrorCode.none and set(configs) == KAFKA_TOPIC_CONFIGS
    assert (configs["retention.ms"].value, configs["retention.ms"].config_source) == ("1000", 1)
    for name, value in (("cleanup.policy", "delete"), ("compression.type", "producer"),
                        ("max.message.bytes", "1048588"), ("message.timestamp.after.max.ms", "3600000"),
                        ("message.timestamp.type", "CreateTime")):
        assert (configs[name].value, configs[name].config_source, configs[name].read_only) == (value, 5, False)
    node = raw.call("metadata", 12, topics=(), allow_auto_topic_creation=False,
                    include_topic_authorized_operations=False).brokers[0].node_id
    code, configs = describe(4, str(node), ("message.max.bytes", "num.partitions"))
    assert code == ErrorCode.none
    assert configs["message.max.bytes"].read_only is False and configs["num.partitions"].read_only is True
    assert describe(4, str(node + 7), ("num.partitions",))[0] == ErrorCode.invalid_request


def test_records_stamped_more_than_an_hour_ahead_are_refused(raw, new_topic):
    """Kafka 4's message.timestamp.after.max.ms (default 1 hour): a CreateTime batch with a
    record stamped further in the future is INVALID_TIMESTAMP; a topic may allow more."""
    t = new_topic()
    hour = 3_600_000

    def stamped(ms_ahead: int) -> bytes:
        b = bytearray(make_batch(1))
        ts = int(time.time() * 1000) + ms_ahead
        struct.pack_into(">qq", b, 27, ts, ts)  # base and max timestamp
        struct.pack_into(">I", b, 17, crc32c(bytes(b[21:])))
        return bytes(b)

    assert raw.produce(t, 0, stamped(hour + 60_000))[0] == ErrorCode.invalid_timestamp
    assert raw.produce(t, 0, stamped(hour - 60_000)) == (ErrorCode.none, 0)
    lenient = new_topic(config={"message.timestamp.after.max.ms": str(10 * hour)})
    assert raw.produce(lenient, 0, stamped(hour + 60_000)) == (ErrorCode.none, 0)

