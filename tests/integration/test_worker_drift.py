"""The worker's drift deltas through real processes: the committed deltas count every
committed score exactly once, across a SIGKILL and a rebalance (two replicas, one killed
and restarted), with unique delta_ids and schema-valid records.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import orjson

from .worker_harness import (
    Feeder, WorkerProc, assert_exactly_once, committed_offsets, outcome, partition_ends, read_all, wait_until,
    wait_working, worker_env,
)

PARTITIONS = 4
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "records" / "drift_delta.json").read_text())


def test_drift_deltas_sum_to_scored_events_across_sigkill_and_rebalance(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=PARTITIONS, prefix="drift-eos")
    feeder = Feeder(bootstrap, topic, rate=3000, seed=21, bad_fraction=0.01)
    group = f"g-{topic}"
    a = WorkerProc(worker_env(bootstrap, topic, replica="a", group=group), tmp_path / "a.log").start()
    wait_working(a)
    b = WorkerProc(worker_env(bootstrap, topic, replica="b", group=group), tmp_path / "b.log").start()  # rebalance
    wait_working(b, transactions=3)
    b.kill()                                                                                           # SIGKILL
    b.start()
    wait_working(b)
    total = feeder.stop()
    ends = partition_ends(bootstrap, topic, PARTITIONS)
    wait_until(lambda: sum(committed_offsets(bootstrap, group, topic, PARTITIONS).values()) == total,
               timeout=120, what="the replicas to commit every input offset")
    for w in (a, b):
        w.wait_started()
        assert w.terminate() == 0, w.log()[-3000:]
    out = outcome(bootstrap, topic, total)
    assert_exactly_once(out, topic, ends)
    deltas = [orjson.loads(m.value()) for m in read_all(bootstrap, f"{topic}-drift", timeout=30)]
    assert deltas, "scores were committed without a single drift delta"
    for d in deltas:
        jsonschema.validate(d, SCHEMA)
    ids = Counter(d["delta_id"] for d in deltas)
    assert all(v == 1 for v in ids.values()), [k for k, v in ids.items() if v > 1][:5]
    assert sum(d["count"] for d in deltas) == len(out.scores)
    assert {d["replica"] for d in deltas} <= {"a", "b"}
    assert all(sum(f["bins"]) + f["missing"] == d["count"] for d in deltas for f in d["features"].values())
