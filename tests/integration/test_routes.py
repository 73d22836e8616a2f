"""Routes: one worker serves two kinds of events, each with its own model, scores and dead letters.

Flows go to the flow classifier and auth events to the auth anomaly model; a canary deployed
live on one route must not touch the other. Checked from the committed topics: every input
offset of each topic has exactly one output in its own route's topics, and every record
names its route's model.
"""

from __future__ import annotations

import threading
import time

import orjson

from workers.control import ModelRef, initial_deployment
from workers.kafka.telemetry_producer import produce_telemetry

from .test_model_lifecycle import _copy_model, _write_control
from .worker_harness import (
    ROOT,
    WorkerProc,
    assert_exactly_once,
    committed_offsets,
    outcome,
    partition_ends,
    read_all,
    wait_until,
    worker_env,
)

AUTH = ROOT / "models" / "auth_anomaly"
FLOW = ROOT / "models" / "flow_classifier"


def test_two_routes_in_one_worker_keep_their_models_and_topics_apart(bootstrap, new_topic, tmp_path):
    flows = new_topic(partitions=2, prefix="rflows")
    auth = new_topic(partitions=2, prefix="rauth")
    group = f"g-{flows}"
    routes = [
        {"name": "flows", "input_topics": [flows], "scores": f"{flows}-scores", "dlq": f"{flows}-dlq",
         "model": {"path": str(FLOW)}},
        {"name": "auth", "input_topics": [auth], "scores": f"{auth}-scores", "dlq": f"{auth}-dlq",
         "model": {"path": str(AUTH)}},
    ]
    env = worker_env(bootstrap, flows, replica="r0", group=group,
                     SLUICE_KAFKA__INPUT_TOPICS=orjson.dumps([flows, auth]).decode(),
                     SLUICE_ROUTES=orjson.dumps(routes).decode())
    stop = threading.Event()
    feeders = [threading.Thread(target=produce_telemetry, args=(bootstrap, topic), daemon=True,
                                kwargs={"kind": kind, "count": 10_000_000, "rate": 800, "seed": seed,
                                        "bad_fraction": 0.02, "stop": stop})
               for topic, kind, seed in ((flows, "flow", 41), (auth, "auth", 42))]
    for f in feeders:
        f.start()
    w = WorkerProc(env, tmp_path / "worker.log").start()
    w.wait_started()
    wait_until(lambda: sum(committed_offsets(bootstrap, group, auth, 2).values()) > 1500, 60,
               what="auth outputs:\n" + w.log()[-3000:])
    # A live canary on the auth route only (a re-versioned copy of its model).
    v2 = _copy_model(AUTH, tmp_path / "auth_v2", "1.1.0")
    base = initial_deployment(group, "auth", AUTH, "onnxruntime", "cpu")
    dep = base.succeeded_by(primary=base.primary, canary=ModelRef.from_folder(v2), fraction=0.25, reason="auth canary")
    _write_control(bootstrap, f"{flows}-control", dep)

    def applied() -> bool:
        return any(orjson.loads(m.value()).get("deployment") == dep.id
                   for m in read_all(bootstrap, f"{flows}-audit", timeout=5, idle=0.5))

    wait_until(applied, 120, what="the auth canary to be applied:\n" + w.log()[-3000:])
    time.sleep(3.0)  # canary traffic
    stop.set()
    for f in feeders:
        f.join(60)
    totals = {}
    for topic in (flows, auth):
        ends = partition_ends(bootstrap, topic, 2)
        totals[topic] = ends
        wait_until(lambda t=topic, e=ends: sum(committed_offsets(bootstrap, group, t, 2).values()) == sum(e.values()),
                   120, what=f"every offset of {topic} committed:\n" + w.log()[-3000:])
    assert w.terminate() == 0, w.log()[-3000:]

    names = {flows: "flow_classifier", auth: "auth_anomaly"}
    for topic, ends in totals.items():
        out = outcome(bootstrap, topic, sum(ends.values()))
        assert_exactly_once(out, topic, ends)  # only this topic's offsets, in this route's topics
        records = [orjson.loads(m.value()) for m in out.scores]
        assert {r["model"]["name"] for r in records} == {names[topic]}
        roles = {r["role"] for r in records}
        if topic == auth:
            assert "canary" in roles, "the auth canary never scored"
            assert {r["model"]["version"] for r in records if r["role"] == "canary"} == {"1.1.0"}
        else:
            assert roles == {"primary"} and {r["deployment"] for r in records} == {
                initial_deployment(group, "flows", FLOW, "onnxruntime", "cpu").id}
    audits = [orjson.loads(m.value()) for m in read_all(bootstrap, f"{flows}-audit", timeout=10)]
    assert {a["route"] for a in audits if a["deployment"] == dep.id} == {"auth"}
