"""Drift deltas and reports: exact bins, mergeable sums, PSI on calm vs drifted traffic,
idempotent windowed merging, schemas, and the accumulator's cost per event."""

from __future__ import annotations

import bisect
import json
import random
import time
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest

from workers import telemetry
from workers.drift import DriftAccumulator, DriftSettings, build_report, load_reference, merge, window_start
from workers.drift_aggregator import BadDelta, References, WindowedMerger, parse_delta
from workers.features import Featurizer, ModelSpec

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "flow_classifier"
SCHEMAS = ROOT / "schemas" / "records"


@pytest.fixture(scope="module")
def spec():
    return ModelSpec.load(MODEL)


@pytest.fixture(scope="module")
def fz(spec):
    return Featurizer(spec)


@pytest.fixture(scope="module")
def backend(spec):
    from workers.inference import create_backend

    return create_backend(spec)


def _batch(fz, n, seed, drift=0.0, start_ts=1_790_000_000.0, rate=1000.0):
    values = [v for _, v, _ in telemetry.generate("flow", n, seed=seed, drift=drift, start_ts=start_ts, rate=rate)]
    return fz.featurize(values)


def _reference_bins(baseline_doc, raw):
    """Pure-Python binning straight from baseline.json (the reference for the vectorized code)."""
    out = {}
    for j, f in enumerate(baseline_doc["features"]):
        nb = len(f["frequencies"])
        counts, missing = [0] * nb, 0
        for x in raw[:, j].tolist():
            if x != x:
                missing += 1
            elif f["kind"] == "numeric":
                counts[bisect.bisect_right(f["edges"], x)] += 1
            else:
                counts[f["codes"].index(x) if x in f["codes"] else len(f["codes"])] += 1
        out[f["name"]] = (counts, missing)
    return out


def test_bins_are_exactly_those_of_baseline_json(spec, fz):
    fb = _batch(fz, 3000, seed=11, drift=1.5)
    raw = fb.raw.copy()
    # edge cases: exact edges, NaN (missing), unknown / fractional / negative codes, beyond training range
    doc = json.loads(spec.baseline_path.read_text())
    names = [f["name"] for f in doc["features"]]
    bi, port_svc, flags = names.index("bytes_in"), names.index("dst_port_service"), names.index("tcp_flags")
    raw[0, bi] = doc["features"][bi]["edges"][3]
    raw[1, bi] = np.nan
    raw[2, bi] = 1e15
    raw[3, port_svc] = 99
    raw[4, port_svc] = 2.5
    raw[5, port_svc] = -1
    raw[6, flags] = 7  # not a baseline code
    raw[7, flags] = np.nan
    acc = DriftAccumulator(spec, "r1")
    acc.add(raw[:1000], np.linspace(0, 1, 1000), fb.event_ts[:1000])
    acc.add(raw[1000:], np.linspace(0, 1, len(raw) - 1000), fb.event_ts[1000:])
    d = orjson.loads(acc.take_delta())
    want = _reference_bins(doc, raw)
    for name, (counts, missing) in want.items():
        assert d["features"][name]["bins"] == counts, name
        assert d["features"][name]["missing"] == missing, name
        assert sum(counts) + missing == len(raw)
    assert d["features"]["bytes_in"]["out_of_range"] >= 1
    assert d["features"]["dst_port_service"]["out_of_range"] == 3
    assert d["features"]["tcp_flags"]["out_of_range"] == want["tcp_flags"][0][-1] >= 1
    # score bins: 10 equal-width on [0, 1], 1.0 in the last
    s = np.concatenate([np.linspace(0, 1, 1000), np.linspace(0, 1, len(raw) - 1000)])
    ref_scores = [0] * 10
    for x in s.tolist():
        ref_scores[min(int(x * 10), 9)] += 1
    assert d["score"]["bins"] == ref_scores
    assert d["count"] == len(raw)
    assert d["window"] == {"start": float(np.nanmin(fb.event_ts)), "end": float(np.nanmax(fb.event_ts))}


def test_take_delta_resets_and_reset_forgets(spec, fz):
    fb = _batch(fz, 500, seed=2)
    acc = DriftAccumulator(spec, "r1")
    assert acc.take_delta() is None
    acc.add(fb.raw, np.zeros(len(fb.raw)), fb.event_ts)
    acc.reset()  # aborted transaction
    assert acc.take_delta() is None
    acc.add(fb.raw[:100], np.zeros(100), fb.event_ts[:100])
    d1 = orjson.loads(acc.take_delta())
    acc.add(fb.raw[100:], np.zeros(400), fb.event_ts[100:])
    d2 = orjson.loads(acc.take_delta())
    assert (d1["count"], d2["count"]) == (100, 400)
    assert d1["delta_id"] != d2["delta_id"] and d2["seq"] == d1["seq"] + 1
    assert d1["delta_id"].startswith("r1:")
    assert acc.take_delta() is None
    # a new accumulator (a restarted worker) never reuses an id
    other = DriftAccumulator(spec, "r1")
    other.add(fb.raw[:100], np.zeros(100), fb.event_ts[:100])
    assert orjson.loads(other.take_delta())["delta_id"] != d1["delta_id"]


def test_merge_is_associative_commutative_and_sums_counts(spec, fz):
    fb = _batch(fz, 4000, seed=3, drift=0.7)
    acc = DriftAccumulator(spec, "r1")
    deltas = []
    for i in range(0, 4000, 700):
        acc.add(fb.raw[i:i + 700], np.random.default_rng(i).random(len(fb.raw[i:i + 700])), fb.event_ts[i:i + 700])
        deltas.append(orjson.loads(acc.take_delta()))
    whole = merge(deltas)
    left = merge([merge(deltas[:2]), merge(deltas[2:])])
    shuffled = deltas[:]
    random.Random(0).shuffle(shuffled)
    right = merge([merge(shuffled[:3]), merge(shuffled[3:])])
    for s in (left, right):
        assert s["count"] == whole["count"] == 4000
        assert s["features"].keys() == whole["features"].keys()
        for k in whole["features"]:
            assert s["features"][k]["bins"] == whole["features"][k]["bins"]
            assert s["features"][k]["missing"] == whole["features"][k]["missing"]
            assert s["features"][k]["sum"] == pytest.approx(whole["features"][k]["sum"])
        assert s["score"]["bins"] == whole["score"]["bins"]
        assert s["window"] == whole["window"]
        assert s["deltas"] == len(deltas)
    # one delta of everything == the merge of the parts
    acc.add(fb.raw, np.zeros(len(fb.raw)), fb.event_ts)
    one = orjson.loads(acc.take_delta())
    for k in whole["features"]:
        assert one["features"][k]["bins"] == whole["features"][k]["bins"]


def _psis(spec, fz, backend, drift, n=20_000, seed=555):
    fb = _batch(fz, n, seed=seed, drift=drift)
    scores = backend.infer(fb.matrix)
    acc = DriftAccumulator(spec, "r1")
    for i in range(0, len(fb.raw), 1024):
        acc.add(fb.raw[i:i + 1024], scores[i:i + 1024], fb.event_ts[i:i + 1024])
    delta = orjson.loads(acc.take_delta())
    rep = build_report(merge([delta]), load_reference(spec), window=(0.0, 60.0), psi_alert=0.2)
    return rep, acc.recent_psi()


def test_psi_low_on_training_like_traffic_and_high_under_drift(spec, fz, backend):
    calm, calm_recent = _psis(spec, fz, backend, 0.0)
    assert calm["max_psi"] < 0.1, calm["features"]
    assert calm["alerts"] == []
    assert max(calm_recent.values()) < 0.1
    drifted, drifted_recent = _psis(spec, fz, backend, 2.0)
    assert drifted["max_psi"] > 0.25, drifted["features"]
    assert drifted["alerts"] and all(a["psi"] >= 0.2 for a in drifted["alerts"])
    assert max(drifted_recent.values()) > 0.25
    assert calm["count"] == drifted["count"] == 20_000


def test_psi_crosses_0_25_on_drift_1_traffic(spec, fz, backend):
    drifted, _ = _psis(spec, fz, backend, 1.0)
    assert drifted["max_psi"] > 0.25, {k: v["psi"] for k, v in drifted["features"].items()}


def test_recent_psi_covers_only_recent_deltas(spec, fz, backend):
    now = [1000.0]
    acc = DriftAccumulator(spec, "r1", recent_s=60, clock=lambda: now[0])
    assert acc.recent_psi() == {}
    fb = _batch(fz, 3000, seed=9, drift=2.0)
    acc.add(fb.raw, backend.infer(fb.matrix), fb.event_ts)
    acc.take_delta()
    assert max(acc.recent_psi().values()) > 0.25
    now[0] += 61
    fb = _batch(fz, 3000, seed=10, drift=0.0)
    acc.add(fb.raw, backend.infer(fb.matrix), fb.event_ts)
    acc.take_delta()
    assert max(acc.recent_psi().values()) < 0.1


# ----------------------------------------------------------------------------- windowed merging


def _deltas(spec, fz, n, seed, replica="r1", per=500, start_ts=1_790_000_000.0, rate=100.0, drift=0.0):
    fb = _batch(fz, n, seed=seed, start_ts=start_ts, rate=rate, drift=drift)
    acc = DriftAccumulator(spec, replica)
    out = []
    for i in range(0, len(fb.raw), per):
        k = len(fb.raw[i:i + per])
        acc.add(fb.raw[i:i + per], np.full(k, 0.02), fb.event_ts[i:i + per])
        out.append(orjson.loads(acc.take_delta()))
    return out


def _merger(window_s=10.0, grace_s=2.0, idle_s=5.0):
    s = DriftSettings(window_s=window_s, grace_s=grace_s, idle_s=idle_s)
    return WindowedMerger(s, References(MODEL.parent), {}, {}, {})


def test_windows_close_after_grace_and_every_delta_counts_once(spec, fz):
    deltas = _deltas(spec, fz, 5000, seed=4) + _deltas(spec, fz, 3000, seed=5, replica="r2", per=300)
    deltas.sort(key=lambda d: d["window"]["end"])
    m = _merger()
    reports = []
    for d in deltas:
        reports += m.on_delta(d, 0, now=100.0)
    # the last windows are still open (within grace / no later events) ...
    assert sum(r["count"] for r in reports) < 8000
    assert m.on_tick(0, now=101.0) == []          # not idle yet
    reports += m.on_tick(0, now=106.0)            # idle: close the rest
    assert sum(r["count"] for r in reports) == 8000
    starts = [r["window"]["start"] for r in reports]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    for r in reports:
        assert r["window"]["end"] - r["window"]["start"] == 10.0
        assert r["observed"]["end"] < r["window"]["end"] and r["observed"]["end"] >= r["window"]["start"]
    assert {"r1", "r2"} <= set().union(*[set(r["replicas"]) for r in reports])


def test_duplicate_delta_ids_do_not_change_reports(spec, fz):
    deltas = _deltas(spec, fz, 4000, seed=6)
    once, twice = _merger(), _merger()
    r_once, r_twice = [], []
    for d in deltas:
        r_once += once.on_delta(d, 0, now=1.0)
    for d in deltas + deltas[:3] + [deltas[-1]]:
        r_twice += twice.on_delta(json.loads(json.dumps(d)), 0, now=1.0)
    r_once += once.on_tick(0, now=100.0)
    r_twice += twice.on_tick(0, now=100.0)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "emitted_at"} for r in rs]  # noqa: E731
    assert strip(r_once) == strip(r_twice)
    assert twice.duplicates == 4
    assert sum(r["count"] for r in r_twice) == 4000
    # a duplicate after its window closed is still ignored (not counted as late)
    assert twice.on_delta(deltas[0], 0, now=200.0) == []
    assert twice.on_tick(0, now=300.0) == []


def test_late_delta_is_counted_once_in_an_open_window(spec, fz):
    deltas = _deltas(spec, fz, 3000, seed=7)  # 30 s of event time at 100/s
    m = _merger()
    first, rest = deltas[0], deltas[1:]
    reports = []
    for d in rest:
        reports += m.on_delta(d, 0, now=1.0)
    reports += m.on_delta(first, 0, now=2.0)   # its window closed long ago
    reports += m.on_tick(0, now=50.0)
    assert sum(r["count"] for r in reports) == 3000
    late = [r for r in reports if r["late"]["deltas"]]
    assert len(late) == 1 and late[0]["late"]["count"] == first["count"]


def test_bad_deltas_are_rejected(spec, fz):
    with pytest.raises(BadDelta):
        parse_delta(b"not json")
    with pytest.raises(BadDelta):
        parse_delta(orjson.dumps({"type": "something else"}))
    d = _deltas(spec, fz, 500, seed=8)[0]
    assert parse_delta(orjson.dumps(d))["delta_id"] == d["delta_id"]
    m = _merger()
    bad = json.loads(json.dumps(d))
    bad["features"]["bytes_in"]["bins"] = [1, 2]
    with pytest.raises(ValueError):
        m.on_delta(bad, 0)
    assert m.windows == {} and m.seen == {}  # nothing half-merged
    unknown = dict(d, model={"name": "no_such_model", "version": "1"})
    with pytest.raises(BadDelta):
        m.on_delta(unknown, 0)


def test_window_start_alignment():
    assert window_start(1_790_000_009.99, 10) == 1_790_000_000.0
    assert window_start(1_790_000_010.0, 10) == 1_790_000_010.0


# ----------------------------------------------------------------------------- schemas


def test_deltas_and_reports_validate_against_their_schemas(spec, fz, backend):
    delta_schema = json.loads((SCHEMAS / "drift_delta.json").read_text())
    report_schema = json.loads((SCHEMAS / "drift_report.json").read_text())
    jsonschema.Draft202012Validator.check_schema(delta_schema)
    jsonschema.Draft202012Validator.check_schema(report_schema)
    deltas = _deltas(spec, fz, 2000, seed=12, drift=1.0)
    for d in deltas:
        jsonschema.validate(d, delta_schema)
    m = _merger()
    reports = []
    for d in deltas:
        reports += m.on_delta(d, 0, now=1.0)
    reports += m.on_tick(0, now=100.0)
    assert reports
    for r in reports:
        jsonschema.validate(r, report_schema)
    rep, _ = _psis(spec, fz, backend, 1.0, n=3000)
    jsonschema.validate(json.loads(json.dumps(rep)), report_schema)
    # a delta missing a field or with a negative count does not validate
    broken = dict(deltas[0])
    del broken["delta_id"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, delta_schema)


# ----------------------------------------------------------------------------- cost


def test_accumulator_cost_per_event(spec, fz):
    """add() is vectorized: well under a microsecond per event at worker batch sizes."""
    fb = _batch(fz, 20_480, seed=13)
    scores = np.random.default_rng(0).random(len(fb.raw)).astype(np.float32)
    acc = DriftAccumulator(spec, "r1")
    B = 1024
    chunks = [(fb.raw[i:i + B], scores[i:i + B], fb.event_ts[i:i + B]) for i in range(0, len(fb.raw), B)]
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for c in chunks:
            acc.add(*c)
        acc.take_delta()
        best = min(best, (time.perf_counter() - t) / len(fb.raw))
    print(f"drift accumulator: {best * 1e6:.3f} us/event at batch {B}")
    assert best < 3e-6, f"{best * 1e6:.2f} us/event"
