"""The real worker into the real drift aggregator: two `sluice run` replicas score a calm
stream (drift 0) and then a drifted one (drift 2.0, 30% attacks), each in its own event-time
window; their transactional, lz4-compressed drift deltas go through `[topics] drift` into
`sluice drift-aggregator`, whose reports must

* be valid against schemas/records/drift_report.json,
* count exactly the events the worker committed scores for (dead letters never count), once
  (every committed delta in exactly one report),
* carry a PSI for every feature of the model and for the score,
* stay low for the calm window (no alert) and exceed the alert threshold for the drifted one,
  for features and for the score.

Nothing else writes the deltas: the aggregator decodes the worker's own producer output, so a
codec missing from aiokafka (``pip install 'sluice[faust]'`` brings lz4, snappy, zstd) fails
here. Every wait is on a topic (or a log line), never on a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import jsonschema
import orjson
import pytest
from confluent_kafka import Producer

from workers import telemetry
from workers.drift_aggregator import check_codecs
from workers.exit_codes import ConfigError
from workers.features import ModelSpec

from . import worker_harness
from .readers import drift_aggregator_settled, read_to_end
from .worker_harness import MODEL, ROOT, WorkerProc, outcome, read_all, wait_until, worker_env

pytest.importorskip("faust", reason="the drift aggregator needs faust-streaming: pip install 'sluice[faust]'")

SCHEMAS = ROOT / "schemas" / "records"
REPORT_SCHEMA = json.loads((SCHEMAS / "drift_report.json").read_text())
DELTA_SCHEMA = json.loads((SCHEMAS / "drift_delta.json").read_text())
PARTITIONS = 2
WINDOW_S = 10.0
PSI_ALERT = 0.2
T_CALM = 1_790_000_000.0            # aligned to WINDOW_S: the calm events' window
T_DRIFT = T_CALM + WINDOW_S         # the next window: the drifted events'
N_CALM = 3000                       # 1 ms apart in event time: 3 s, inside one window
N_DRIFT = 3000
BAD_FRACTION = 0.02                 # dead letters: scored by nobody, counted in no report
# drift=2.0 shifts the features (max PSI about 1) but not the score: the classifier still
# calls benign traffic benign. More attacks than in training (5%) shift the score too.
ATTACKS_DRIFT = 0.3


def _produce(bootstrap: str, topic: str, count: int, *, seed: int, drift: float, start_ts: float,
             attack_fraction: float = 0.05) -> int:
    """Telemetry with event times start_ts + i ms, as `sluice produce` sends it (idempotent, lz4)."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                  "compression.type": "lz4"})
    errors: list = []
    for key, value, headers in telemetry.generate("flow", count, seed=seed, bad_fraction=BAD_FRACTION,
                                                  start_ts=start_ts, drift=drift, attack_fraction=attack_fraction):
        while True:
            try:
                p.produce(topic, value, key, headers=headers,
                          on_delivery=lambda err, _m: errors.append(err) if err is not None else None)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0 and not errors, errors[:3]
    return count


def _start_aggregator(bootstrap: str, drift_topic: str, reports: str, group: str, tmp_path: Path):
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
input_topics = ["unused"]
session_timeout_ms = 6000
[topics]
drift = "{drift_topic}"
[model]
path = "{MODEL}"
[logging]
format = "json"
[drift]
window_s = {WINDOW_S}
grace_s = 1
idle_s = 6          # closes the drifted window; a pause this long mid-stream would split one (late)
psi_alert = {PSI_ALERT}
reports_topic = "{reports}"
group_id = "{group}"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    log_path = tmp_path / "aggregator.log"
    proc = subprocess.Popen([sys.executable, "-m", "workers", "drift-aggregator", "--config", str(cfg),
                             "--data-dir", str(tmp_path / "aggregator-data")],
                            cwd=ROOT, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    worker_harness._STARTED.append(proc)  # killed by the conftest if the test fails before its own cleanup
    return proc, log_path


def _assigned(w: WorkerProc) -> int:
    """Partitions the worker holds now, from its latest assigned/revoked log line (0 before any)."""
    total = 0
    for line in w.log_path.read_bytes().splitlines():
        if b'"partitions assigned"' in line or b'"partitions revoked"' in line:
            try:
                total = int(orjson.loads(line).get("total", total))
            except orjson.JSONDecodeError:
                pass
    return total


def _stop(proc: subprocess.Popen, timeout: float = 30) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return None
    return proc.returncode


def test_worker_deltas_become_windowed_psi_reports(bootstrap, new_topic, tmp_path):
    t_start = time.monotonic()
    spec = ModelSpec.load(MODEL)
    topic = new_topic(partitions=PARTITIONS, prefix="w2agg")
    drift_topic, reports_topic = f"{topic}-drift", f"{topic}-reports"
    group = f"g-{topic}"
    # the replicas and the aggregator start together (each takes seconds); whichever is first
    # creates the drift topic (the deltas are keyed by model: one partition carries them all)
    workers = [WorkerProc(worker_env(bootstrap, topic, replica=r, group=group,
                                     SLUICE_TOPICS__PARTITIONS=str(PARTITIONS)), tmp_path / f"{r}.log").start()
               for r in ("a", "b")]
    agg_group = f"agg-{uuid.uuid4().hex[:8]}"
    agg, agg_log = _start_aggregator(bootstrap, drift_topic, reports_topic, agg_group, tmp_path)
    try:
        for w in workers:
            w.wait_started(90)
            assert w.alive(), w.log()[-3000:]
        # both replicas hold a partition: no rebalance pause in the middle of a window
        wait_until(lambda: all(_assigned(w) >= 1 for w in workers), 60, what="both replicas to own a partition")

        # calm window, then (once all of it is committed) the drifted window: no transaction,
        # hence no delta, mixes the two
        _produce(bootstrap, topic, N_CALM, seed=7, drift=0.0, start_ts=T_CALM)
        calm = outcome(bootstrap, topic, N_CALM)
        assert len(calm.scores) + len(calm.dead_letters) == N_CALM, (len(calm.scores), len(calm.dead_letters))
        _produce(bootstrap, topic, N_DRIFT, seed=8, drift=2.0, start_ts=T_DRIFT, attack_fraction=ATTACKS_DRIFT)
        both = outcome(bootstrap, topic, N_CALM + N_DRIFT)
        for w in workers:
            assert w.terminate() == 0, w.log()[-3000:]  # drained: the drift topic is final
        scores = [orjson.loads(m.value()) for m in both.scores]
        assert len(scores) + len(both.dead_letters) == N_CALM + N_DRIFT
        assert Counter(s["event_id"] for s in scores).most_common(1)[0][1] == 1
        scored_calm = sum(1 for s in scores if s["event_ts"] < T_DRIFT)
        scored_drift = len(scores) - scored_calm
        assert scored_calm == len(calm.scores) and 0 < scored_drift < N_DRIFT

        deltas = [orjson.loads(m.value()) for m in read_all(bootstrap, drift_topic, timeout=30, idle=1.0)]
        for d in deltas:
            jsonschema.validate(d, DELTA_SCHEMA)
        assert sum(d["count"] for d in deltas) == len(scores), "the deltas do not count the committed scores"
        assert {d["replica"] for d in deltas} == {"a", "b"}

        # Every report the aggregator will publish from these deltas (extras included, were it to
        # count one twice) is committed once it has consumed them all and closed every window.
        wait_until(lambda: agg.poll() is not None or drift_aggregator_settled(bootstrap, agg_group, drift_topic),
                   timeout=90, interval=1.0, what="the aggregator to consume every delta and close every window")
        assert agg.poll() is None, f"the aggregator exited {agg.returncode}:\n{agg_log.read_text()[-4000:]}"
        got = [orjson.loads(m.value()) for msgs in read_to_end(bootstrap, reports_topic).values() for m in msgs]
    finally:
        _stop(agg)
    text = agg_log.read_text(errors="replace")
    summary = [(r["report_id"], r["count"], r["deltas"], r["late"], r["max_psi"]) for r in got]
    assert got, f"no drift report; aggregator log:\n{text[-4000:]}"
    assert "delta rejected" not in text, text[-4000:]

    # every committed delta in exactly one report, every scored event counted once
    assert sum(r["deltas"] for r in got) == len(deltas), summary
    assert sum(r["count"] for r in got) == len(scores), summary
    assert len({r["report_id"] for r in got}) == len(got), summary
    features = {f.name for f in spec.features}
    for r in got:
        jsonschema.validate(r, REPORT_SCHEMA)
        assert r["model"]["name"] == "flow_classifier"
        assert r["psi_alert"] == PSI_ALERT
        assert r["late"] == {"count": 0, "deltas": 0}, summary
        assert set(r["replicas"]) <= {"a", "b"}
        assert set(r["features"]) == features, summary                 # a PSI per feature
        assert isinstance(r["score"]["psi"], float)                       # and for the score
        assert r["window"]["start"] in (T_CALM, T_DRIFT), summary
    by_window = {start: [r for r in got if r["window"]["start"] == start] for start in (T_CALM, T_DRIFT)}
    # each stream in its own window, counted exactly: one report each
    assert [r["count"] for r in by_window[T_CALM]] == [scored_calm], summary
    assert [r["count"] for r in by_window[T_DRIFT]] == [scored_drift], summary
    calm_r, drift_r = by_window[T_CALM][0], by_window[T_DRIFT][0]
    calm_psi = {name: f["psi"] for name, f in calm_r["features"].items()} | {"score": calm_r["score"]["psi"]}
    drift_psi = {name: f["psi"] for name, f in drift_r["features"].items()} | {"score": drift_r["score"]["psi"]}
    # calm: every PSI low, no alert
    assert calm_r["alerts"] == [] and calm_r["max_psi"] < 0.1, calm_psi
    assert max(calm_psi.values()) == pytest.approx(calm_r["max_psi"])
    # drifted: above the alert threshold, for features and for the score
    assert drift_r["max_psi"] >= PSI_ALERT and drift_r["max_psi"] > 10 * calm_r["max_psi"], drift_psi
    alerted = {a["name"] for a in drift_r["alerts"]}
    assert alerted == {n for n, v in drift_psi.items() if v >= PSI_ALERT}, (drift_r["alerts"], drift_psi)
    assert any(a["kind"] == "feature" for a in drift_r["alerts"]), drift_psi
    assert {"name": "score", "kind": "score", "psi": drift_psi["score"]} in drift_r["alerts"], drift_psi
    assert drift_r["score"]["mean"] > calm_r["score"]["mean"] + 0.1, (calm_r["score"], drift_r["score"])
    print(f"calm max PSI {calm_r['max_psi']:.4f}, drifted max PSI {drift_r['max_psi']:.4f} "
          f"(score {calm_psi['score']:.4f} -> {drift_psi['score']:.4f}); {len(deltas)} deltas, "
          f"{len(got)} reports, {time.monotonic() - t_start:.1f} s")


def test_aggregator_refuses_to_start_without_the_lz4_codec(monkeypatch):
    """Without aiokafka's codec extras the aggregator would crash on the worker's first lz4 delta
    (UnsupportedCodecError); it refuses to start instead (exit 2), naming the extra to install."""
    from aiokafka import codec

    check_codecs()  # this environment has them: `sluice[faust]` brings aiokafka[lz4,snappy,zstd]
    monkeypatch.setattr(codec, "has_lz4", lambda: False)
    with pytest.raises(ConfigError, match=r"lz4.*pip install 'sluice\[faust\]'"):
        check_codecs()
