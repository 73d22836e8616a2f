"""`sluice drift-aggregator` through a broker: deltas of two replicas (one duplicated, one
inside an aborted transaction) become windowed reports that count every committed delta
exactly once, across a SIGKILL of the aggregator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema
import orjson
import pytest
from confluent_kafka import Producer

from tests.integration.readers import drift_aggregator_settled, read_to_end
from tests.integration.worker_harness import read_all, wait_until
from workers import telemetry
from workers.drift import DriftAccumulator
from workers.features import Featurizer, ModelSpec
from workers.inference import create_backend

pytest.importorskip("faust", reason="the drift aggregator needs faust-streaming: pip install 'faust-streaming>=0.11,<1'")

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "flow_classifier"
SCHEMA = json.loads((ROOT / "schemas" / "records" / "drift_report.json").read_text())
WINDOW_S = 10.0
T0 = 1_790_000_000.0  # aligned to WINDOW_S


def _deltas(spec, fz, be, replica, n, seed, start_ts, drift=0.0, per=400):
    fb = fz.featurize([v for _, v, _ in telemetry.generate("flow", n, seed=seed, start_ts=start_ts, rate=100.0, drift=drift)])
    scores = be.infer(fb.matrix)
    acc = DriftAccumulator(spec, replica)
    out = []
    for i in range(0, len(fb.raw), per):
        sl = slice(i, i + per)
        acc.add(fb.raw[sl], scores[sl], fb.event_ts[sl])
        out.append(acc.take_delta())
    return out


def _produce(bootstrap, topic, values, *, abort=False):
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"drift-test-{uuid.uuid4().hex[:8]}"})
    p.init_transactions(30)
    p.begin_transaction()
    for v in values:
        p.produce(topic, key=b"flow_classifier", value=v)
    p.flush(30)
    if abort:
        p.abort_transaction(30)
    else:
        p.commit_transaction(30)


def _start(bootstrap, topic, reports, group, log_path, commit_interval_s=1.0):
    """The aggregator as a process, its faust data directory beside its log (never in the
    working directory)."""
    cfg = log_path.parent / "drift.toml"
    cfg.write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
input_topics = ["{topic}-in"]
session_timeout_ms = 6000
[topics]
drift = "{topic}"
[model]
path = "{MODEL}"
[logging]
format = "json"
[drift]
window_s = {WINDOW_S}
grace_s = 2
idle_s = 3
reports_topic = "{reports}"
group_id = "{group}"
commit_interval_s = {commit_interval_s}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.Popen([sys.executable, "-m", "workers", "drift-aggregator", "--config", str(cfg),
                             "--data-dir", str(log_path.parent / "aggregator-data")],
                            cwd=ROOT, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def _reports(bootstrap, reports, want, timeout=90.0):
    """The committed reports, once they count at least `want` events (or at the timeout)."""
    got: list = []

    def enough() -> bool:
        got[:] = [orjson.loads(m.value()) for m in read_all(bootstrap, reports, timeout=5, idle=1.0)]
        return sum(r["count"] for r in got) >= want

    try:
        wait_until(enough, timeout, interval=1.0, what=f"reports counting {want} events")
    except AssertionError:
        pass  # the caller's assertions say what is missing
    return got


def _settled_reports(bootstrap, agg, group, topic, reports, want, log):
    """Every committed report, once the aggregator can publish nothing more. Anything extra
    (double counting) would come from a delta still unconsumed or a window still open: wait
    until neither is left, then read the reports to their end."""
    _reports(bootstrap, reports, want=want)
    wait_until(lambda: agg.poll() is not None or drift_aggregator_settled(bootstrap, group, topic, 2),
               timeout=60, interval=1.0, what="the aggregator to consume every delta and close every window")
    assert agg.poll() is None, log.read_text()[-3000:]
    return [orjson.loads(m.value()) for msgs in read_to_end(bootstrap, reports, 2).values() for m in msgs]


def _stop(agg):
    if agg.poll() is None:
        agg.send_signal(signal.SIGTERM)
        try:
            agg.wait(30)
        except subprocess.TimeoutExpired:
            agg.kill()


def test_reports_count_committed_deltas_once_across_a_kill(bootstrap, new_topic, tmp_path):
    spec = ModelSpec.load(MODEL)
    fz, be = Featurizer(spec), create_backend(spec)
    topic = new_topic(2, "drift")
    reports, group = f"{topic}-reports", f"agg-{uuid.uuid4().hex[:8]}"
    # 25 s of event time per replica: windows T0, T0+10, T0+20
    r1 = _deltas(spec, fz, be, "r1", 2500, seed=1, start_ts=T0)
    r2 = _deltas(spec, fz, be, "r2", 2500, seed=2, start_ts=T0 + 0.005)
    zombie = _deltas(spec, fz, be, "r3", 1200, seed=3, start_ts=T0, drift=3.0)  # an aborted transaction's
    first = r1[:3] + r2[:3]            # window T0 only (0..12 s): stays open until later deltas
    _produce(bootstrap, topic, first)
    _produce(bootstrap, topic, zombie, abort=True)
    log = tmp_path / "aggregator.log"
    agg = _start(bootstrap, topic, reports, group, log)
    try:
        # the idle close publishes window T0 (+ the 10 s window part of those deltas)
        got = _reports(bootstrap, reports, want=sum(orjson.loads(d)["count"] for d in first))
        assert got, log.read_text()[-3000:]
        agg.send_signal(signal.SIGKILL)
        agg.wait(30)
        rest = r1[3:] + r2[3:]
        _produce(bootstrap, topic, rest + [r1[0], r2[4]])  # + two duplicates, one of a closed window
        agg = _start(bootstrap, topic, reports, group, log)
        want = sum(orjson.loads(d)["count"] for d in r1 + r2)
        got = _settled_reports(bootstrap, agg, group, topic, reports, want, log)
    finally:
        _stop(agg)
    text = log.read_text()
    assert (tmp_path / "aggregator-data").is_dir() and not (ROOT / f"{group}-data").exists()  # --data-dir
    _assert_counted_once(got, want, len(r1) + len(r2), text)
    assert "duplicate delta ignored" in text


def _assert_counted_once(got, want, deltas, text):
    assert sum(r["count"] for r in got) == want, ([(r["report_id"], r["count"], r["deltas"]) for r in got], text[-3000:])
    assert sum(r["deltas"] for r in got) == deltas
    ids = [r["report_id"] for r in got]
    assert len(ids) == len(set(ids)), ids
    for r in got:
        jsonschema.validate(r, SCHEMA)
        assert r["model"] == {"name": "flow_classifier", "version": "1.0.0"}
        assert set(r["replicas"]) <= {"r1", "r2"}        # never the aborted r3
        assert r["window"]["end"] - r["window"]["start"] == WINDOW_S
        assert r["window"]["start"] in (T0, T0 + 10, T0 + 20), r["window"]
    # calm traffic: no alerts (the aborted, strongly drifted delta never counted)
    full = [r for r in got if r["count"] >= 1000]
    assert full and all(r["max_psi"] < 0.1 for r in full), [(r["count"], r["max_psi"]) for r in got]


def test_a_report_commits_with_its_offsets_or_not_at_all(bootstrap, new_topic, tmp_path):
    """A report published into a transaction that a SIGKILL ends uncommitted is never readable;
    the next aggregator redoes that work and publishes it once. (faust writes to a topic it does
    not consume outside the transaction unless told otherwise: the report then showed at once,
    and twice after the restart.)"""
    spec = ModelSpec.load(MODEL)
    fz, be = Featurizer(spec), create_backend(spec)
    topic = new_topic(2, "drift")
    reports, group = f"{topic}-reports", f"agg-{uuid.uuid4().hex[:8]}"
    r1 = _deltas(spec, fz, be, "r1", 2500, seed=1, start_ts=T0)
    _produce(bootstrap, topic, r1)
    log = tmp_path / "aggregator.log"
    # The first aggregator's transaction stays open far longer than the test needs it to.
    agg = _start(bootstrap, topic, reports, group, log, commit_interval_s=600)
    try:
        wait_until(lambda: agg.poll() is not None or log.read_text().count("drift report ") >= 3, timeout=90,
                   what="the idle close to publish the three windows")
        assert agg.poll() is None, log.read_text()[-3000:]
        early = [m for msgs in read_to_end(bootstrap, reports, 2).values() for m in msgs]
        agg.send_signal(signal.SIGKILL)
        agg.wait(30)
        assert early == [], "a report was readable before its transaction committed"
        agg = _start(bootstrap, topic, reports, group, log)
        want = sum(orjson.loads(d)["count"] for d in r1)
        got = _settled_reports(bootstrap, agg, group, topic, reports, want, log)
    finally:
        _stop(agg)
    _assert_counted_once(got, want, len(r1), log.read_text())
