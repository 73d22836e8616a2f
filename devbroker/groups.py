"""Group coordinator, classic protocol: membership, rebalances (eager and
cooperative clients alike: the broker only picks a common protocol and relays
the leader's assignment), static membership (KIP-345), session/rebalance
timeouts, and committed offsets."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .broker import Broker

EMPTY = "Empty"
PREPARING = "PreparingRebalance"
COMPLETING = "CompletingRebalance"
STABLE = "Stable"


class GroupError(Exception):
    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def _mono() -> float:
    return time.monotonic()


class Member:
    __slots__ = ("member_id", "instance_id", "client_id", "client_host", "session_timeout",
                 "rebalance_timeout", "protocol_type", "protocols", "assignment", "join_fut",
                 "sync_fut", "last_seen")

    def __init__(self, member_id: str, instance_id: str | None, client_id: str, client_host: str,
                 session_timeout: float, rebalance_timeout: float, protocol_type: str,
                 protocols: list[tuple[str, bytes]]):
        self.member_id = member_id
        self.instance_id = instance_id
        self.client_id = client_id
        self.client_host = client_host
        self.session_timeout = session_timeout
        self.rebalance_timeout = rebalance_timeout
        self.protocol_type = protocol_type
        self.protocols = protocols
        self.assignment = b""
        self.join_fut: asyncio.Future | None = None
        self.sync_fut: asyncio.Future | None = None
        self.last_seen = _mono()

    def metadata_for(self, protocol: str) -> bytes:
        for name, meta in self.protocols:
            if name == protocol:
                return meta
        return b""


class Group:
    def __init__(self, group_id: str):
        self.group_id = group_id
        self.state = EMPTY
        self.generation = 0
        self.protocol_type: str | None = None
        self.protocol: str | None = None
        self.leader: str | None = None
        self.members: dict[str, Member] = {}
        self.static: dict[str, str] = {}  # group.instance.id -> member id
        self.pending: dict[str, float] = {}  # member ids handed out by MEMBER_ID_REQUIRED -> deadline
        self.rebalance_deadline = 0.0
        self.join_not_before = 0.0  # group.initial.rebalance.delay for an empty group


class JoinResult:
    __slots__ = ("error", "generation", "protocol_type", "protocol", "leader", "member_id", "members")

    def __init__(self, error: str = "none", generation: int = -1, protocol_type: str | None = None,
                 protocol: str | None = None, leader: str = "", member_id: str = "",
                 members: list | None = None):
        self.error = error
        self.generation = generation
        self.protocol_type = protocol_type
        self.protocol = protocol
        self.leader = leader
        self.member_id = member_id
        self.members = members or []


class GroupCoordinator:
    def __init__(self, broker: "Broker"):
        self.broker = broker
        self.groups: dict[str, Group] = {}
        # group -> (topic, partition) -> (offset, metadata, leader epoch)
        self.offsets: dict[str, dict[tuple[str, int], tuple[int, str | None, int]]] = {}

    # ---- offsets ----------------------------------------------------------------------------
    def load_offsets(self, group: str, rows: list) -> None:
        d = self.offsets.setdefault(group, {})
        for t, p, off, meta, le in rows:
            d[(t, p)] = (off, meta, le)

    @staticmethod
    def dump_offsets(offs: dict) -> list:
        return [[t, p, o, m, le] for (t, p), (o, m, le) in offs.items()]

    # ---- group metadata persistence (Kafka keeps it in __consumer_offsets) ------------------
    # Written when a generation's assignment is complete (Stable), when the group empties and
    # when a static member's id is replaced; loaded as a Stable group whose members' sessions
    # restart at load time, so a broker restart causes no rebalance, and generations go on.
    @staticmethod
    def group_record(g: Group) -> dict[str, Any]:
        enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
        return {"k": "group", "id": g.group_id, "gen": g.generation, "pt": g.protocol_type,
                "proto": g.protocol, "leader": g.leader,
                "members": [[m.member_id, m.instance_id, m.client_id, m.client_host, m.session_timeout,
                             m.rebalance_timeout, m.protocol_type,
                             [[n, enc(meta)] for n, meta in m.protocols], enc(m.assignment)]
                            for m in g.members.values()]}

    def load_group(self, r: dict[str, Any]) -> None:
        g = Group(r["id"])
        g.generation = r["gen"]
        for mid, iid, cid, host, session, rebalance, pt, protos, assignment in r["members"]:
            m = Member(mid, iid, cid, host, session, rebalance, pt,
                       [(n, base64.b64decode(meta)) for n, meta in protos])
            m.assignment = base64.b64decode(assignment)
            g.members[mid] = m
            if iid:
                g.static[iid] = mid
        if g.members:
            g.state = STABLE
            g.protocol_type, g.protocol, g.leader = r["pt"], r["proto"], r["leader"]
        self.groups[g.group_id] = g

    def dump_groups(self) -> list[dict[str, Any]]:
        return [self.group_record(g) for g in self.groups.values()
                if g.state in (STABLE, EMPTY) and (g.members or g.generation > 0)]

    def _persist(self, g: Group) -> None:
        self.broker.journal.append(self.group_record(g))

    def store_offsets(self, group: str, offs: dict[tuple[str, int], tuple[int, str | None, int]]) -> None:
        if not offs:
            return
        self.broker.journal.append({"k": "offsets", "group": group, "o": self.dump_offsets(offs)})
        self.offsets.setdefault(group, {}).update(offs)

    def drop_topic(self, topic: str) -> None:
        for group, offs in list(self.offsets.items()):
            for tp in [tp for tp in offs if tp[0] == topic]:
                del offs[tp]
            if not offs:
                del self.offsets[group]

    def validate_member(self, group_id: str, generation: int, member_id: str,
                        instance_id: str | None, for_commit: bool) -> str:
        """Error code name for an offset commit (plain, or transactional with KIP-447 member
        information), in the order of Kafka's GroupCoordinator.validateOffsetCommit."""
        g = self.groups.get(group_id)
        with_member = generation >= 0 or bool(member_id) or bool(instance_id)
        if for_commit and generation < 0 and (g is None or g.state == EMPTY):
            return "none"  # a simple commit: an empty group takes it (Kafka creates one if need be)
        if g is None:
            # Kafka knows a group that only had offsets committed (the simple group it created
            # then): it finds no such member there; an unknown group has no such generation
            if with_member and (not for_commit or group_id in self.offsets):
                return "unknown_member_id"
            return "illegal_generation" if for_commit and generation >= 0 else "none"
        if with_member:
            if instance_id:
                cur = g.static.get(instance_id)
                if cur is None:
                    return "unknown_member_id"
                if cur != member_id:
                    return "fenced_instance_id"
            if member_id not in g.members:
                return "unknown_member_id"
            if generation != g.generation:
                return "illegal_generation"
        elif for_commit and g.state != EMPTY:
            return "unknown_member_id"  # no generation: only an empty group takes such commits
        if for_commit and g.state == COMPLETING:
            return "rebalance_in_progress"
        if member_id in g.members:
            g.members[member_id].last_seen = _mono()
        return "none"

    # ---- membership -------------------------------------------------------------------------
    def _group(self, group_id: str) -> Group:
        g = self.groups.get(group_id)
        if g is None:
            g = self.groups[group_id] = Group(group_id)
        return g

    async def join(self, group_id: str, member_id: str, instance_id: str | None, client_id: str,
                   client_host: str, session_timeout_ms: int, rebalance_timeout_ms: int,
                   protocol_type: str, protocols: list[tuple[str, bytes]],
                   require_known_member_id: bool) -> JoinResult:
        cfg = self.broker.config
        if not group_id:
            return JoinResult("invalid_group_id")
        if not (cfg.min_session_timeout_ms <= session_timeout_ms <= cfg.max_session_timeout_ms):
            return JoinResult("invalid_session_timeout", member_id=member_id)
        g = self._group(group_id)
        if not protocols or (g.members and g.protocol_type not in (None, protocol_type)):
            return JoinResult("inconsistent_group_protocol", member_id=member_id)
        names = {n for n, _ in protocols}
        if g.members and not all(names & {n for n, _ in m.protocols} for m in g.members.values()
                                 if m.member_id != member_id):
            return JoinResult("inconsistent_group_protocol", member_id=member_id)
        session = session_timeout_ms / 1000.0
        rebalance = (rebalance_timeout_ms if rebalance_timeout_ms > 0 else session_timeout_ms) / 1000.0

        if not member_id:
            if instance_id and instance_id in g.static:
                return await self._rejoin_static(g, instance_id, client_id, client_host, session,
                                                 rebalance, protocol_type, protocols)
            new_id = f"{client_id}-{uuid.uuid4()}"
            if require_known_member_id and not instance_id:
                g.pending[new_id] = _mono() + session
                return JoinResult("member_id_required", member_id=new_id)
            m = Member(new_id, instance_id, client_id, client_host, session, rebalance,
                       protocol_type, protocols)
            return await self._add_member_and_wait(g, m)

        # known member id
        if instance_id and instance_id in g.static and g.static[instance_id] != member_id:
            return JoinResult("fenced_instance_id", member_id=member_id)
        if member_id in g.pending:
            del g.pending[member_id]
            m = Member(member_id, instance_id, client_id, client_host, session, rebalance,
                       protocol_type, protocols)
            return await self._add_member_and_wait(g, m)
        m = g.members.get(member_id)
        if m is None:
            return JoinResult("unknown_member_id", member_id=member_id)
        m.last_seen = _mono()
        m.session_timeout, m.rebalance_timeout = session, rebalance
        if g.state == PREPARING:
            m.protocols = protocols
            return await self._await_join(g, m)
        if g.state in (COMPLETING, STABLE):
            same = m.protocols == protocols
            if same and (g.state == COMPLETING or member_id != g.leader):
                # a retried join with unchanged metadata: current generation as is
                return self._join_result(g, m, include_members=(member_id == g.leader))
            m.protocols = protocols
            self._prepare_rebalance(g)
            return await self._await_join(g, m)
        return JoinResult("unknown_member_id", member_id=member_id)

    async def _rejoin_static(self, g: Group, instance_id: str, client_id: str, client_host: str,
                             session: float, rebalance: float, protocol_type: str,
                             protocols: list[tuple[str, bytes]]) -> JoinResult:
        old_id = g.static[instance_id]
        m = g.members.get(old_id)
        if m is None:  # stale mapping
            del g.static[instance_id]
            m = Member(f"{client_id}-{uuid.uuid4()}", instance_id, client_id, client_host, session,
                       rebalance, protocol_type, protocols)
            return await self._add_member_and_wait(g, m)
        new_id = f"{client_id}-{uuid.uuid4()}"
        # fence whoever still waits under the old member id
        if m.join_fut is not None and not m.join_fut.done():
            m.join_fut.set_result(JoinResult("fenced_instance_id", member_id=old_id))
        if m.sync_fut is not None and not m.sync_fut.done():
            m.sync_fut.set_result(("fenced_instance_id", b""))
        m.join_fut = m.sync_fut = None
        old_leader = g.leader
        del g.members[old_id]
        m.member_id = new_id
        m.client_id, m.client_host = client_id, client_host
        m.session_timeout, m.rebalance_timeout = session, rebalance
        m.last_seen = _mono()
        g.members[new_id] = m
        g.static[instance_id] = new_id
        if g.leader == old_id:
            g.leader = new_id
        if g.state == STABLE and g.protocol in {n for n, _ in protocols}:
            # KIP-345: no rebalance; the member gets its old assignment in SyncGroup.
            # The old leader id is returned so the new member does not run an assignment.
            m.protocols = protocols
            self._persist(g)
            return JoinResult("none", g.generation, g.protocol_type, g.protocol, old_leader or "",
                              new_id, [])
        m.protocols = protocols
        if g.state != PREPARING:
            self._prepare_rebalance(g)
        return await self._await_join(g, m)

    async def _add_member_and_wait(self, g: Group, m: Member) -> JoinResult:
        g.members[m.member_id] = m
        if m.instance_id:
            g.static[m.instance_id] = m.member_id
        if g.protocol_type is None or g.state == EMPTY:
            g.protocol_type = m.protocol_type
        if g.state != PREPARING:
            self._prepare_rebalance(g)
        return await self._await_join(g, m)

    async def _await_join(self, g: Group, m: Member) -> JoinResult:
        loop = asyncio.get_running_loop()
        if m.join_fut is not None and not m.join_fut.done():
            m.join_fut.set_result(JoinResult("unknown_member_id", member_id=m.member_id))
        fut = m.join_fut = loop.create_future()
        self._maybe_complete_join(g)
        return await fut

    def _prepare_rebalance(self, g: Group) -> None:
        if g.state == COMPLETING:
            for m in g.members.values():
                if m.sync_fut is not None and not m.sync_fut.done():
                    m.sync_fut.set_result(("rebalance_in_progress", b""))
                m.sync_fut = None
        now = _mono()
        was_empty = g.state == EMPTY
        g.state = PREPARING
        timeout = max((m.rebalance_timeout for m in g.members.values()), default=5.0)
        g.rebalance_deadline = now + timeout
        loop = asyncio.get_running_loop()
        gen = g.generation
        loop.call_later(timeout + 0.001, self._rebalance_timeout, g, gen)
        if was_empty:
            delay = self.broker.config.initial_rebalance_delay_ms / 1000.0
            g.join_not_before = now + delay
            if delay > 0:
                loop.call_later(delay + 0.001, self._maybe_complete_join, g)
        else:
            g.join_not_before = 0.0

    def _rebalance_timeout(self, g: Group, gen: int) -> None:
        if g.state != PREPARING or g.generation != gen:
            return
        for m in list(g.members.values()):
            if m.join_fut is None or m.join_fut.done():
                self._drop(g, m)
        g.pending.clear()
        self._maybe_complete_join(g, force=True)

    def _maybe_complete_join(self, g: Group, force: bool = False) -> None:
        if g.state != PREPARING:
            return
        if not force:
            if _mono() < g.join_not_before:
                return
            if g.pending:
                return
            if any(m.join_fut is None or m.join_fut.done() for m in g.members.values()):
                return
        g.generation += 1
        if not g.members:
            # Kafka keeps an empty group's protocol type (DescribeGroups/ListGroups show it);
            # the next member to join sets it again
            g.state = EMPTY
            g.protocol = None
            g.leader = None
            self._persist(g)
            return
        g.protocol = self._select_protocol(g)
        if g.leader not in g.members:
            g.leader = next(iter(g.members))
        g.state = COMPLETING
        now = _mono()
        for m in g.members.values():
            m.last_seen = now
            fut, m.join_fut = m.join_fut, None
            if fut is not None and not fut.done():
                fut.set_result(self._join_result(g, m, include_members=(m.member_id == g.leader)))

    def _join_result(self, g: Group, m: Member, include_members: bool) -> JoinResult:
        members = []
        if include_members:
            members = [(x.member_id, x.instance_id, x.metadata_for(g.protocol or ""))
                       for x in g.members.values()]
        return JoinResult("none", g.generation, g.protocol_type, g.protocol, g.leader or "",
                          m.member_id, members)

    @staticmethod
    def _select_protocol(g: Group) -> str:
        members = list(g.members.values())
        common = set(n for n, _ in members[0].protocols)
        for m in members[1:]:
            common &= {n for n, _ in m.protocols}
        votes: dict[str, int] = {}
        for m in members:
            for n, _ in m.protocols:
                if n in common:
                    votes[n] = votes.get(n, 0) + 1
                    break
        # most votes; ties resolved by the first member's preference order
        order = [n for n, _ in members[0].protocols if n in common]
        return max(order, key=lambda n: (votes.get(n, 0), -order.index(n)))

    def _drop(self, g: Group, m: Member) -> None:
        g.members.pop(m.member_id, None)
        if m.instance_id and g.static.get(m.instance_id) == m.member_id:
            del g.static[m.instance_id]
        for fut, val in ((m.join_fut, JoinResult("unknown_member_id", member_id=m.member_id)),
                         (m.sync_fut, ("unknown_member_id", b""))):
            if fut is not None and not fut.done():
                fut.set_result(val)
        m.join_fut = m.sync_fut = None

    def _remove_member(self, g: Group, m: Member) -> None:
        self._drop(g, m)
        if g.state in (STABLE, COMPLETING):
            self._prepare_rebalance(g)
        if g.state == PREPARING:
            self._maybe_complete_join(g)

    async def sync(self, group_id: str, generation: int, member_id: str, instance_id: str | None,
                   assignments: list[tuple[str, bytes]]) -> tuple[str, bytes, Group | None]:
        g = self.groups.get(group_id)
        if g is None:
            return "unknown_member_id", b"", None
        code = _validate_member(g, member_id, instance_id)
        if code != "none":
            return code, b"", g
        m = g.members[member_id]
        if generation != g.generation:
            return "illegal_generation", b"", g
        m.last_seen = _mono()
        if g.state == PREPARING:
            return "rebalance_in_progress", b"", g
        if g.state == STABLE:
            return "none", m.assignment, g
        if g.state != COMPLETING:
            return "unknown_member_id", b"", g
        fut = m.sync_fut = asyncio.get_running_loop().create_future()
        if member_id == g.leader:
            given = dict(assignments)
            for x in g.members.values():
                x.assignment = given.get(x.member_id, b"")
            g.state = STABLE
            now = _mono()
            for x in g.members.values():
                x.last_seen = now
                f, x.sync_fut = x.sync_fut, None
                if f is not None and not f.done():
                    f.set_result(("none", x.assignment))
            self._persist(g)
        code, assignment = await fut
        return code, assignment, g

    def heartbeat(self, group_id: str, generation: int, member_id: str, instance_id: str | None) -> str:
        g = self.groups.get(group_id)
        if g is None:
            return "unknown_member_id"
        code = _validate_member(g, member_id, instance_id)
        if code != "none":
            return code
        m = g.members[member_id]
        if generation != g.generation:
            return "illegal_generation"
        m.last_seen = _mono()
        if g.state == PREPARING:
            return "rebalance_in_progress"
        return "none"

    def leave(self, group_id: str, members: list[tuple[str, str | None]]) -> tuple[str, list[tuple[str, str | None, str]]]:
        g = self.groups.get(group_id)
        out = []
        if g is None:  # Kafka: no group-level error, each member is unknown
            return "none", [(mid, iid, "unknown_member_id") for mid, iid in members]
        for mid, iid in members:
            if iid:
                cur = g.static.get(iid)
                if cur is None:
                    out.append((mid, iid, "unknown_member_id"))
                    continue
                if mid and cur != mid:
                    out.append((mid, iid, "fenced_instance_id"))
                    continue
                mid = cur
            m = g.members.get(mid)
            if m is None:
                if mid in g.pending:
                    del g.pending[mid]
                    self._maybe_complete_join(g)
                    out.append((mid, iid, "none"))
                else:
                    out.append((mid, iid, "unknown_member_id"))
                continue
            self._remove_member(g, m)
            out.append((mid, iid, "none"))
        return "none", out

    def tick(self) -> None:
        """Expire members whose session timed out and stale pending member ids."""
        now = _mono()
        for g in list(self.groups.values()):
            if g.pending:
                for mid, deadline in list(g.pending.items()):
                    if now > deadline:
                        del g.pending[mid]
                        self._maybe_complete_join(g)
            if g.state == PREPARING:
                self._maybe_complete_join(g)
            for m in list(g.members.values()):
                if m.join_fut is not None and not m.join_fut.done():
                    continue  # waiting in a rebalance: bounded by the rebalance timeout
                if now - m.last_seen > m.session_timeout:
                    self._remove_member(g, m)

    def describe(self, group_id: str) -> Group | None:
        return self.groups.get(group_id)

    def delete(self, group_id: str) -> str:
        g = self.groups.get(group_id)
        if g is not None and g.members:
            return "non_empty_group"
        if g is None and group_id not in self.offsets:
            return "group_id_not_found"
        had_group = self.groups.pop(group_id, None) is not None
        if (self.offsets.pop(group_id, None) is not None) | had_group:
            self.broker.journal.append({"k": "delgroup", "group": group_id})
        return "none"

    def list(self) -> list[tuple[str, str, str]]:
        out = []
        names = set(self.groups) | set(self.offsets)
        for name in sorted(names):
            g = self.groups.get(name)
            # a group only committed to (no member ever joined) has no protocol type, as in Kafka
            out.append((name, (g.protocol_type if g else None) or "", g.state if g else EMPTY))
        return out

    def touch(self, group_id: str, member_id: str) -> None:
        g = self.groups.get(group_id)
        if g is not None and member_id in g.members:
            g.members[member_id].last_seen = _mono()

    def info(self, group_id: str) -> dict[str, Any]:
        g = self.groups.get(group_id)
        return {"state": g.state if g else "Dead"}


def _validate_member(g: "Group", member_id: str, instance_id: str | None) -> str:
    """Kafka's ClassicGroup.validateMember (Heartbeat, SyncGroup): a static member is known by
    its instance id, which must be mapped (else UNKNOWN_MEMBER_ID) to this member id (else
    FENCED_INSTANCE_ID); a dynamic member by its member id."""
    if instance_id:
        cur = g.static.get(instance_id)
        if cur is None:
            return "unknown_member_id"
        if cur != member_id:
            return "fenced_instance_id"
    if member_id not in g.members:
        return "unknown_member_id"
    return "none"

