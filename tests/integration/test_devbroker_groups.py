"""Consumer groups through librdkafka: partition sharing and rebalance on
join/leave, cooperative-sticky, and static membership (KIP-345)."""

from __future__ import annotations

import json
import threading
import time
import uuid

from confluent_kafka import Consumer


class Member:
    """A consumer polled on its own thread, recording its assignments."""

    def __init__(self, bootstrap: str, group: str, topic: str, **extra):
        conf = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 100, "topic.metadata.refresh.interval.ms": 1000,
                # librdkafka's own view of the group (join state, rebalances counted), for tests
                # that must show that nothing happened
                "statistics.interval.ms": 100, "stats_cb": self._on_stats}
        conf.update(extra)
        self.cgrp: dict = {}
        self.stats_seen = 0
        self.c = Consumer(conf)
        self.assigned: set[int] = set()
        self.assign_calls = 0
        self.revoke_calls = 0
        self.lock = threading.Lock()
        self.stop_flag = False
        self.cooperative = conf.get("partition.assignment.strategy") == "cooperative-sticky"
        self.c.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _on_assign(self, c, parts):
        with self.lock:
            self.assign_calls += 1
            if self.cooperative:
                self.assigned |= {p.partition for p in parts}
            else:
                self.assigned = {p.partition for p in parts}

    def _on_stats(self, text: str) -> None:
        self.cgrp = json.loads(text).get("cgrp", {})
        self.stats_seen += 1

    def steady_snapshot_after(self, seen: int) -> bool:
        """A statistics snapshot taken after the `seen`-th shows the membership steady."""
        return self.stats_seen > seen + 1 and self.cgrp.get("join_state") == "steady"

    def _on_revoke(self, c, parts):
        with self.lock:
            self.revoke_calls += 1
            self.assigned -= {p.partition for p in parts}

    def _run(self):
        while not self.stop_flag:
            self.c.poll(0.05)

    def close(self, leave: bool = True):
        self.stop_flag = True
        self.t.join()
        self.c.close()


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_two_members_share_partitions_and_survivor_takes_all_after_leave(bootstrap, new_topic):
    t = new_topic(partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    a = Member(bootstrap, group, t)
    assert wait_for(lambda: a.assigned == {0, 1, 2, 3})
    b = Member(bootstrap, group, t)
    assert wait_for(lambda: len(a.assigned) == 2 and len(b.assigned) == 2 and not a.assigned & b.assigned)
    b.close()
    assert wait_for(lambda: a.assigned == {0, 1, 2, 3})
    a.close()


def test_cooperative_sticky_members_split_partitions(bootstrap, new_topic):
    t = new_topic(partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    extra = {"partition.assignment.strategy": "cooperative-sticky"}
    a = Member(bootstrap, group, t, **extra)
    assert wait_for(lambda: a.assigned == {0, 1, 2, 3})
    b = Member(bootstrap, group, t, **extra)
    assert wait_for(lambda: len(a.assigned) == 2 and len(b.assigned) == 2 and not a.assigned & b.assigned)
    b.close()
    assert wait_for(lambda: a.assigned == {0, 1, 2, 3})
    a.close()


def test_static_member_rejoins_without_rebalance(bootstrap, new_topic):
    t = new_topic(partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    a = Member(bootstrap, group, t, **{"group.instance.id": "static-a"})
    b = Member(bootstrap, group, t, **{"group.instance.id": "static-b"})
    assert wait_for(lambda: len(a.assigned) == 2 and len(b.assigned) == 2 and not a.assigned & b.assigned)
    seen = a.stats_seen
    assert wait_for(lambda: a.steady_snapshot_after(seen)), a.cgrp  # no rebalance under way
    a_calls, a_rebalances = a.assign_calls, a.cgrp["rebalance_cnt"]
    b_parts = set(b.assigned)
    b.close()  # a static member does not leave the group on close
    b2 = Member(bootstrap, group, t, **{"group.instance.id": "static-b"})
    assert wait_for(lambda: b2.assigned == b_parts)
    # b2's assignment completes only once every member has joined, so a rebalance caused by its
    # return would already be counted in a's next statistics snapshot
    seen = a.stats_seen
    assert wait_for(lambda: a.steady_snapshot_after(seen)), a.cgrp
    assert a.cgrp["rebalance_cnt"] == a_rebalances, "the other member saw a rebalance"
    assert a.assign_calls == a_calls, "the other member saw a rebalance"
    assert b2.assigned == b_parts
    a.close()
    b2.close()


def test_three_members_started_together_cover_every_partition_once(bootstrap, new_topic):
    t = new_topic(partitions=6)
    group = f"g-{uuid.uuid4().hex[:8]}"
    ms = [Member(bootstrap, group, t) for _ in range(3)]

    def balanced():
        parts = [m.assigned for m in ms]
        return all(len(p) == 2 for p in parts) and set().union(*parts) == set(range(6))

    assert wait_for(balanced)
    ms[0].close()
    assert wait_for(lambda: sorted(len(m.assigned) for m in ms[1:]) == [3, 3]
                    and ms[1].assigned | ms[2].assigned == set(range(6)))
    for m in ms[1:]:
        m.close()
