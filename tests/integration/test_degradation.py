"""Graceful degradation: a route whose model cannot keep up switches to its fallback and back.

A slow primary (a test backend that sleeps per batch) gets more events per second than it can
score; the route must switch to its fallback within the configured time, its records must say
``"degraded": true`` with the fallback's lineage, the lag must stay bounded, the route must come
back to its primary once the pressure has passed, and every input must have exactly one output.
"""

from __future__ import annotations

import threading
import time

import orjson

from workers.kafka.telemetry_producer import produce_telemetry

from .worker_harness import (
    MODEL,
    WorkerProc,
    assert_exactly_once,
    committed_offsets,
    outcome,
    partition_ends,
    wait_until,
    worker_env,
)

PARTITIONS = 2
AFTER_S = 3.0
RECOVER_AFTER_S = 4.0


def _feed(bootstrap, topic, rate, seconds, seed) -> None:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    produce_telemetry(bootstrap, topic, count=10_000_000, rate=rate, seed=seed, stop=stop)


def test_slow_primary_degrades_to_its_fallback_and_recovers(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=PARTITIONS, prefix="degrade")
    group = f"g-{topic}"
    env = worker_env(bootstrap, topic, replica="r0", group=group,
                     SLUICE_MODEL__BACKEND="tests.backends:SlowOnnxRuntime",
                     SLUICE_TEST_BACKEND_DELAY_S="0.5",           # the primary scores at most ~500 events/s
                     SLUICE_DEGRADE__FALLBACK=str(MODEL), SLUICE_DEGRADE__FALLBACK_BACKEND="onnxruntime",
                     SLUICE_DEGRADE__MAX_P99_MS="3000", SLUICE_DEGRADE__AFTER_S=str(AFTER_S),
                     SLUICE_DEGRADE__RECOVER_AFTER_S=str(RECOVER_AFTER_S))
    w = WorkerProc(env, tmp_path / "worker.log").start()
    w.wait_started()
    _feed(bootstrap, topic, rate=2500, seconds=12, seed=31)      # 5x the primary's capacity
    ends = partition_ends(bootstrap, topic, PARTITIONS)
    lag_at_end = sum(ends.values()) - sum(max(0, o) for o in committed_offsets(bootstrap, group, topic, PARTITIONS).values())
    # Bounded: undegraded, the backlog would be ~80% of the 30k produced (the primary does ~500/s).
    assert lag_at_end < 0.25 * sum(ends.values()), f"lag {lag_at_end} of {sum(ends.values())}"
    assert w.metric("sluice_route_degraded", route="flow_classifier") == 1 or \
        w.metric("sluice_deployment_events_total", event="recovered") >= 1
    _feed(bootstrap, topic, rate=40, seconds=RECOVER_AFTER_S + 8, seed=32)  # light traffic: the primary copes
    wait_until(lambda: w.metric("sluice_route_degraded", route="flow_classifier") == 0, 60,
               what="the route to recover:\n" + w.log()[-3000:])
    _feed(bootstrap, topic, rate=40, seconds=3, seed=33)
    ends = partition_ends(bootstrap, topic, PARTITIONS)
    total = sum(ends.values())
    wait_until(lambda: sum(committed_offsets(bootstrap, group, topic, PARTITIONS).values()) == total, 120,
               what="every input committed")
    assert w.terminate() == 0, w.log()[-3000:]

    out = outcome(bootstrap, topic, total)
    assert_exactly_once(out, topic, ends)
    lines = [orjson.loads(ln) for ln in w.log().splitlines() if ln.startswith("{")]
    degraded = [ln for ln in lines if ln["msg"] == "route degraded to its fallback"]
    assert degraded, w.log()[-3000:]
    assert degraded[0]["pressure_for_s"] <= AFTER_S + 2.0  # judged once a second
    records = [orjson.loads(m.value()) for m in out.scores]
    flagged = [r for r in records if r.get("degraded")]
    assert len(flagged) > 1000
    assert all(r["deployment"].startswith("flow_classifier@degraded-") for r in flagged)
    assert all(not r["deployment"].startswith("flow_classifier@degraded-") for r in records if not r.get("degraded"))
    # Back on the primary at the end: the last records of each partition are not degraded.
    last = {}
    for r in records:
        p = r["source"]["partition"]
        if r["source"]["offset"] > last.get(p, (-1, None))[0]:
            last[p] = (r["source"]["offset"], r)
    assert all(not r.get("degraded") for _, r in last.values()), last
    print(f"degradation: engaged after {degraded[0]['pressure_for_s']}s of pressure, lag at the end of the "
          f"burst {lag_at_end} of {sum(ends.values())}, degraded records {len(flagged)} of {len(records)}")
