"""`sluice bench --shadow`: the bench's worker run with shadows really scores every event in shadow.

The bench's measured worker run is driven here over a small preloaded topic, once without and
once with a shadow deployment written by the bench itself; the committed topics then show that
the run without wrote no shadow record and the run with wrote one per scored event, named as
the shadow model (role, model sha256, the deployment the bench wrote). The CLI's own report
and JSON are checked end to end on the bench's embedded devbroker.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import orjson

from workers import bench
from workers.control import ModelRef
from workers.kafka.telemetry_producer import produce_telemetry

from .worker_harness import ROOT, read_all

EVENTS = 2000
PARTITIONS = 2
FLOW = ROOT / "models" / "flow_classifier"
# The bench's worker knobs, small: scoring on a thread (no scoring process to start for a test).
ARGS = argparse.Namespace(max_batch_size=512, processes=0, threads=1)


def test_shadow_run_writes_one_shadow_record_per_scored_event(bootstrap, new_topic):
    topic = new_topic(partitions=PARTITIONS, prefix="bshadow")
    assert produce_telemetry(bootstrap, topic, count=EVENTS, seed=7, bad_fraction=0.01) == EVENTS

    plain = bench.worker_throughput(bootstrap, topic, EVENTS, ARGS, run=0)
    assert plain["events"] == EVENTS and "shadow_records" not in plain
    shadow_topic = f"{topic}-shadow"
    # Nothing in shadow without a shadow deployment (the topic exists: the worker created it).
    assert read_all(bootstrap, shadow_topic, timeout=5, idle=1.0) == []

    ref = ModelRef.from_folder(FLOW)
    with_shadow = bench.worker_throughput(bootstrap, topic, EVENTS, ARGS, run=0, shadow=(ref,))
    assert with_shadow["events"] == EVENTS
    scored = with_shadow["scored"]
    assert 0 < scored < EVENTS  # the preload has malformed records: those are not scored at all
    assert with_shadow["shadow_records"] == scored

    records = [orjson.loads(m.value()) for m in read_all(bootstrap, shadow_topic, min_count=scored, timeout=30)]
    assert len(records) == scored
    assert {r["role"] for r in records} == {"shadow"}
    assert {r["model"]["sha256"] for r in records} == {ref.sha256}
    assert {r["deployment"] for r in records} == {with_shadow["deployment"]}
    # One shadow record per scored input offset.
    sources = {(r["source"]["partition"], r["source"]["offset"]) for r in records}
    assert len(sources) == scored


def test_cli_reports_the_shadow_models_and_their_ratio(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "workers", "bench", "--events", "2000", "--repeat", "1", "--latency-seconds", "1",
         "--shadow", str(FLOW), "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "bench: worker, with shadow" in run.stdout, run.stdout[-3000:]
    result = json.loads(out.read_text())
    shadow = result["shadow"]
    assert [m["name"] for m in shadow["models"]] == ["flow_classifier"]
    assert shadow["models"][0]["sha256"] == ModelRef.from_folder(FLOW).sha256
    assert shadow["worker"]["events"] == 2000
    assert shadow["worker"]["shadow_records"] == shadow["worker"]["scored"] > 0
    assert 0 < shadow["with_without_ratio"] < 5
    assert len(result["runs"]["shadow"]) == 1


def test_cli_refuses_a_shadow_that_is_not_a_model(tmp_path):
    run = subprocess.run([sys.executable, "-m", "workers", "bench", "--shadow", str(tmp_path), "--events", "10"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2
    assert f"--shadow {tmp_path}: not a model folder" in run.stderr
