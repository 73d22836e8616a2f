"""Request handlers for consumer groups: JoinGroup, SyncGroup, Heartbeat,
LeaveGroup, OffsetCommit, OffsetFetch, ListGroups, DescribeGroups, DeleteGroups."""

from __future__ import annotations

from typing import Any

from kio.schema.errors import ErrorCode as E

from .api import Ctx
from .broker import Broker
from .protocol import ZERO, ApiSpec, build


def _e(name: str) -> E:
    return getattr(E, name)


async def join_group(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    rebalance_ms = int(req.rebalance_timeout.total_seconds() * 1000) if hasattr(req, "rebalance_timeout") else -1
    session_ms = int(req.session_timeout.total_seconds() * 1000)
    r = await b.groups.join(
        req.group_id, req.member_id, getattr(req, "group_instance_id", None), ctx.client_id,
        ctx.client_host, session_ms, rebalance_ms, req.protocol_type,
        [(p.name, bytes(p.metadata)) for p in req.protocols],
        require_known_member_id=s.version >= 4)
    m_cls = s.resp.JoinGroupResponseMember
    members = tuple(build(m_cls, member_id=mid, group_instance_id=iid, metadata=meta)
                    for mid, iid, meta in r.members)
    return s.make("JoinGroupResponse", throttle_time=ZERO, error_code=_e(r.error),
                  generation_id=r.generation, protocol_type=r.protocol_type,
                  protocol_name=r.protocol if s.version >= 7 or r.protocol is not None else "",
                  leader=r.leader, skip_assignment=False, member_id=r.member_id, members=members)


async def sync_group(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    code, assignment, g = await b.groups.sync(
        req.group_id, req.generation_id, req.member_id, getattr(req, "group_instance_id", None),
        [(a.member_id, bytes(a.assignment)) for a in req.assignments])
    return s.make("SyncGroupResponse", throttle_time=ZERO, error_code=_e(code),
                  protocol_type=g.protocol_type if g else None, protocol_name=g.protocol if g else None,
                  assignment=assignment)


async def heartbeat(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    code = b.groups.heartbeat(req.group_id, req.generation_id, req.member_id,
                              getattr(req, "group_instance_id", None))
    return s.make("HeartbeatResponse", throttle_time=ZERO, error_code=_e(code))


async def leave_group(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    if s.version >= 3:
        members = [(m.member_id, m.group_instance_id) for m in req.members]
    else:
        members = [(req.member_id, None)]
    code, results = b.groups.leave(req.group_id, members)
    if s.version < 3:
        code = results[0][2] if results else code
    mr = s.resp.MemberResponse if hasattr(s.resp, "MemberResponse") else None
    out = tuple(build(mr, member_id=mid, group_instance_id=iid, error_code=_e(c))
                for mid, iid, c in results) if mr else ()
    return s.make("LeaveGroupResponse", throttle_time=ZERO, error_code=_e(code), members=out)


OFFSET_METADATA_MAX_BYTES = 4096  # Kafka's offset.metadata.max.bytes default


async def offset_commit(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    gen = getattr(req, "generation_id_or_member_epoch", getattr(req, "generation_id", -1))
    code = b.groups.validate_member(req.group_id, gen, req.member_id,
                                    getattr(req, "group_instance_id", None), for_commit=True)
    p_cls = s.resp.OffsetCommitResponsePartition
    t_cls = s.resp.OffsetCommitResponseTopic
    offs = {}
    out = []
    for t in req.topics:
        parts = []
        for p in t.partitions:
            pc = code
            # Kafka's order: KafkaApis drops unknown partitions before the coordinator checks
            # the member; then each partition's metadata is checked (offset.metadata.max.bytes)
            if b.log(t.name, p.partition_index) is None:
                pc = "unknown_topic_or_partition"
            elif pc == "none" and len(p.committed_metadata or "") > OFFSET_METADATA_MAX_BYTES:
                pc = "offset_metadata_too_large"
            if pc == "none":
                offs[(t.name, p.partition_index)] = (p.committed_offset, p.committed_metadata,
                                                     getattr(p, "committed_leader_epoch", -1))
            parts.append(build(p_cls, partition_index=p.partition_index, error_code=_e(pc)))
        out.append(build(t_cls, name=t.name, partitions=tuple(parts)))
    b.groups.store_offsets(req.group_id, offs)
    return s.make("OffsetCommitResponse", throttle_time=ZERO, topics=tuple(out))


async def offset_fetch(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    stable = getattr(req, "require_stable", False)
    committed = b.groups.offsets.get(req.group_id, {})
    p_cls = s.resp.OffsetFetchResponsePartition
    t_cls = s.resp.OffsetFetchResponseTopic
    if req.topics is None:
        wanted: dict[str, list[int]] = {}
        for (t, p) in committed:
            wanted.setdefault(t, []).append(p)
    else:
        wanted = {t.name: list(t.partition_indexes) for t in req.topics}
    out = []
    for name, parts in wanted.items():
        rows = []
        for p in parts:
            code = E.none
            off, meta, le = committed.get((name, p), (-1, "", -1))
            if stable and b.txns.has_pending_offset(req.group_id, name, p):
                code = E.unstable_offset_commit
                off, meta, le = -1, "", -1
            rows.append(build(p_cls, partition_index=p, committed_offset=off, committed_leader_epoch=le,
                              metadata=meta if meta is not None else "", error_code=code))
        out.append(build(t_cls, name=name, partitions=tuple(rows)))
    return s.make("OffsetFetchResponse", throttle_time=ZERO, topics=tuple(out), error_code=E.none)


async def list_groups(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    states = set(getattr(req, "states_filter", ()) or ())
    g_cls = s.resp.ListedGroup
    groups = tuple(build(g_cls, group_id=gid, protocol_type=pt, group_state=st)
                   for gid, pt, st in b.groups.list() if not states or st in states)
    return s.make("ListGroupsResponse", throttle_time=ZERO, error_code=E.none, groups=groups)


async def describe_groups(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    g_cls = s.resp.DescribedGroup
    m_cls = s.resp.DescribedGroupMember
    out = []
    for gid in req.groups:
        g = b.groups.describe(gid)
        if g is None:
            state = "Dead" if gid not in b.groups.offsets else "Empty"
            out.append(build(g_cls, error_code=E.none, group_id=gid, group_state=state,
                             protocol_type="", protocol_data="", members=(),
                             authorized_operations=-2147483648))
            continue
        members = tuple(build(m_cls, member_id=m.member_id, group_instance_id=m.instance_id,
                              client_id=m.client_id, client_host=m.client_host,
                              member_metadata=m.metadata_for(g.protocol or ""),
                              member_assignment=m.assignment)
                        for m in g.members.values())
        out.append(build(g_cls, error_code=E.none, group_id=gid, group_state=g.state,
                         protocol_type=g.protocol_type or "", protocol_data=g.protocol or "",
                         members=members, authorized_operations=-2147483648))
    return s.make("DescribeGroupsResponse", throttle_time=ZERO, groups=tuple(out))


async def delete_groups(b: Broker, s: ApiSpec, req: Any, ctx: Ctx) -> Any:
    r_cls = s.resp.DeletableGroupResult
    out = tuple(build(r_cls, group_id=g, error_code=_e(b.groups.delete(g))) for g in req.groups_names)
    return s.make("DeleteGroupsResponse", throttle_time=ZERO, results=out)
