"""Model lifecycle edge cases found in review, through a real worker and broker.

- An aborted transaction's ``applied`` audit records must not be carried into the next
  transaction: the replay writes its own, and a carried one may name a deployment that did not
  produce the outputs at its offsets (another replica's, after a revoke, or one switched from).
- A replica must not load a deployment older than the latest on the control topic: the topic's
  active segment is never compacted, so it holds a route's earlier deployments too.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import orjson
from confluent_kafka import Producer

from workers.config import load_settings
from workers.control import ModelRef, new_deployment
from workers.kafka.producer import FAULTS_ENV
from workers.kafka.telemetry_producer import produce_telemetry
from workers.lifecycle import ControlFollower, read_control

from .worker_harness import (
    MODEL,
    WorkerProc,
    assert_exactly_once,
    committed_offsets,
    outcome,
    partition_ends,
    read_all,
    wait_until,
    worker_env,
)

PARTITIONS = 4
TOTAL = 4_000



def _audits(bootstrap, topic) -> list[dict]:
    return [orjson.loads(m.value()) for m in read_all(bootstrap, f"{topic}-audit", timeout=10, idle=1.0)]


def test_an_aborted_transactions_applied_audits_are_not_carried_into_the_next(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=PARTITIONS, prefix="carry")
    assert produce_telemetry(bootstrap, topic, count=TOTAL, seed=51) == TOTAL
    ends = partition_ends(bootstrap, topic, PARTITIONS)
    group = f"g-{topic}"
    # The first commit fails: its transaction held the first `applied` audit of every partition
    # it had outputs for. The replay audits them again; carried as well, each came twice.
    w = WorkerProc(worker_env(bootstrap, topic, replica="a", group=group, SLUICE_TRANSACTIONS__COMMIT_INTERVAL_MS="20",
                        **{FAULTS_ENV: "commit:abortable@1"}), tmp_path / "a.log").start()
    wait_until(lambda: not w.alive() or sum(committed_offsets(bootstrap, group, topic, PARTITIONS).values()) == TOTAL,
               timeout=120, what="every input offset committed")
    assert w.alive(), w.log()[-3000:]
    assert w.metric("sluice_transactions_aborted_total", reason="commit_failed") == 1
    assert w.terminate() == 0, w.log()[-3000:]
    assert_exactly_once(outcome(bootstrap, topic, TOTAL), topic, ends)
    applied = Counter((o["partition"], o["offset"], a["deployment"])
                      for a in _audits(bootstrap, topic) if a["event"] == "applied" for o in a["offsets"])
    assert set(p for p, _, _ in applied) == set(range(PARTITIONS))
    assert max(applied.values()) == 1, f"applied audits written more than once: {applied}"


def test_a_replica_never_loads_a_deployment_older_than_the_latest(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=2, prefix="hist")
    group = f"g-{topic}"
    route = "flow_classifier"
    control = f"{topic}-control"
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    # 150 earlier deployments (more than the follower's poll of 100) of models this replica does
    # not have, then the latest: the configured model under a deployment of its own.
    current = ModelRef.from_folder(MODEL)
    for i in range(150):
        old = new_deployment(group, route, primary=ModelRef(str(tmp_path / f"gone-{i}"), "flow_classifier",
                                                            f"0.{i}", "0" * 64), reason=f"old {i}")
        p.produce(control, old.encode(), old.key)
    latest = new_deployment(group, route, primary=current, reason="latest")
    p.produce(control, latest.encode(), latest.key)
    assert p.flush(30) == 0
    assert produce_telemetry(bootstrap, topic, count=2_000, seed=52) == 2_000
    w = WorkerProc(worker_env(bootstrap, topic, replica="a", group=group), tmp_path / "a.log").start()
    wait_until(lambda: not w.alive() or sum(committed_offsets(bootstrap, group, topic, 2).values()) == 2_000,
               timeout=120, what="every input offset committed")
    assert w.alive(), w.log()[-3000:]
    # The follower has long read the whole topic (it polls every 0.5 s).
    wait_until(lambda: w.metric("sluice_transactions_committed_total") > 0, 30, what="a commit")
    assert w.terminate() == 0, w.log()[-3000:]
    audits = _audits(bootstrap, topic)
    events = Counter((a["event"], a["deployment"]) for a in audits)
    assert {d for _, d in events} == {latest.id}, f"deployments other than the latest were acted on: {events}"
    assert "loading a new deployment" not in w.log()
    assert not Path(tmp_path / "gone-0").exists()


def test_the_control_topic_is_read_to_its_end_across_transaction_markers(bootstrap, new_topic):
    """A guard rollback is written in a replica's transaction: the start-up read of a replica
    that starts next must get past the commit (and any abort) marker that ends the topic, and
    the follower must go on from there and see only what comes after."""
    control = new_topic(partitions=1, prefix="ctl")
    group, route = "g-ctl", "flow_classifier"
    ref = ModelRef.from_folder(MODEL)
    committed = new_deployment(group, route, primary=ref, reason="committed in a transaction")
    aborted = new_deployment(group, route, primary=ref, reason="aborted")
    tp = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"tx-{control}"})
    tp.init_transactions(30)
    tp.begin_transaction()
    tp.produce(control, committed.encode(), committed.key)
    tp.commit_transaction(30)
    tp.begin_transaction()
    tp.produce(control, aborted.encode(), aborted.key)
    tp.flush(30)
    tp.abort_transaction(30)
    settings = load_settings(None, environ={"SLUICE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                                            "SLUICE_KAFKA__INPUT_TOPICS": '["x"]', "SLUICE_KAFKA__GROUP_ID": group,
                                            "SLUICE_TOPICS__CONTROL": control})
    t0 = time.monotonic()
    latest, starts = read_control(settings, timeout=15)
    assert time.monotonic() - t0 < 10
    assert latest == {route: committed}
    follower = ControlFollower(settings, {route}, start=starts)
    follower.start()
    try:
        newer = new_deployment(group, route, primary=ref, reason="after the start-up read")
        p = Producer({"bootstrap.servers": bootstrap})
        p.produce(control, newer.encode(), newer.key)
        assert p.flush(30) == 0
        seen = []
        wait_until(lambda: seen.extend(follower.take().values()) or newer in seen, 30, what="the follower")
        assert seen == [newer], seen
    finally:
        follower.stop()
