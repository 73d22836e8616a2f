"""sluice models list/check, sluice score, sluice bench-inference; auth telemetry."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jsonschema
import numpy as np
import orjson
import pytest

from workers import telemetry
from workers.features import Featurizer, ModelSpec
from workers.inference import create_backend
from workers.models import check_model
from workers.records import ScoreEncoder

ROOT = pathlib.Path(__file__).resolve().parents[2]


def sluice(*args, stdin: bytes | None = None):
    return subprocess.run([sys.executable, "-m", "workers", *args], input=stdin, capture_output=True, cwd=ROOT, timeout=120)


def test_models_list_json():
    p = sluice("models", "list", "--json")
    assert p.returncode == 0, p.stderr
    models = {m["name"]: m for m in json.loads(p.stdout)}
    assert {"flow_classifier", "auth_anomaly"} <= set(models)
    assert models["auth_anomaly"]["event_kind"] == "auth" and models["flow_classifier"]["event_kind"] == "flow"
    for m in models.values():
        assert m["version"] and (ROOT / m["path"] / "manifest.toml").is_file()
        assert "onnxruntime" in m["backends"]


@pytest.mark.parametrize("name", ["flow_classifier", "auth_anomaly"])
def test_models_check_passes_on_committed_models(name):
    rep = check_model(ROOT / "models" / name, events=1500)
    assert rep.ok, [i for i in rep.items if i["status"] == "FAIL"]
    assert {i["check"] for i in rep.items} >= {"artifacts present", "schema vs features", "onnx metadata", "baseline"}


def _copy(tmp_path, name="auth_anomaly") -> pathlib.Path:
    dst = tmp_path / name
    shutil.copytree(ROOT / "models" / name, dst)
    return dst


def test_models_check_fails_when_the_manifest_drifts_from_the_artifacts(tmp_path):
    m = _copy(tmp_path)
    mf = m / "manifest.toml"
    mf.write_text(mf.read_text().replace('vocab = ["none", "push", "totp", "sms", "webauthn"]', 'vocab = ["none", "push"]'))
    p = sluice("models", "check", str(m))
    assert p.returncode == 1
    assert b"FAIL  onnx input/output" in p.stdout and b"FAIL  baseline" in p.stdout


def test_models_check_fails_when_schema_and_features_disagree(tmp_path):
    m = _copy(tmp_path)
    schema = json.loads((ROOT / "schemas/events/auth.json").read_text())
    schema["properties"]["result"]["enum"] = ["ok", "failed"]
    (m / "auth.json").write_text(json.dumps(schema))
    mf = m / "manifest.toml"
    mf.write_text(mf.read_text().replace('event_schema = "schemas/events/auth.json"', 'event_schema = "auth.json"'))
    rep = check_model(m, events=500)
    bad = {i["check"]: i["detail"] for i in rep.items if i["status"] == "FAIL"}
    assert not rep.ok and "not in the schema enum" in bad["schema vs features"]


def test_models_check_fails_when_torch_weights_differ_from_onnx(tmp_path):
    torch = pytest.importorskip("torch", reason="the parity check needs torch")
    m = _copy(tmp_path, "flow_classifier")
    sd = torch.load(m / "model.pt", weights_only=True)
    sd["body.4.bias"] += 0.5
    torch.save(sd, m / "model.pt")
    rep = check_model(m, events=500)
    assert [i["check"] for i in rep.items if i["status"] == "FAIL"] == ["onnx vs torch"]


def _auth_lines(n=1500, seed=8, bad=0.05) -> list[bytes]:
    return [(v or b"").replace(b"\n", b" ") for _, v, _ in telemetry.generate("auth", n, seed=seed, bad_fraction=bad)]


def test_score_file_gives_the_workers_records_and_reports_every_invalid_line(tmp_path):
    lines = _auth_lines()
    f = tmp_path / "replay.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    p = sluice("score", "--model", "models/auth_anomaly", "--input", str(f))
    assert p.returncode == 0, p.stderr
    recs = [orjson.loads(x) for x in p.stdout.splitlines()]
    err = p.stderr.decode().splitlines()
    dead = [json.loads(x) for x in err if x.startswith("{")]
    assert len(recs) + len(dead) == len(lines)
    assert err[-1].startswith("score: model=auth_anomaly") and f"dead_letters={len(dead)}" in err[-1]
    schema = json.loads((ROOT / "schemas/records/score.json").read_text())
    for r in recs[:50]:
        jsonschema.validate(r, schema)
    # offsets are line numbers; dead letters name theirs
    assert {r["source"]["offset"] for r in recs}.isdisjoint({d["line"] for d in dead})
    assert all(r["source"]["topic"] == "replay.jsonl" and r["source"]["partition"] == 0 for r in recs)
    assert all(lines[d["line"] - 1] is not None and d["reason"] for d in dead)
    # the same bytes the worker encodes (apart from scored_at / source)
    spec = ModelSpec.load(ROOT / "models" / "auth_anomaly")
    fb = Featurizer(spec).featurize(lines)
    scores = create_backend(spec).infer(fb.matrix)
    enc = ScoreEncoder(spec.name, spec.version, spec.threshold).encode(
        fb.event_ids, scores, ["t"] * len(fb), [0] * len(fb), fb.positions.tolist(), fb.event_ts, 0.0)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("scored_at", "source")}  # noqa: E731
    assert [strip(orjson.loads(e)) for e in enc] == [strip(r) for r in recs]


def test_score_stdin_and_dead_letter_file(tmp_path):
    lines = [b'{"not": "an event"}', b"garbage"] + _auth_lines(20, seed=9, bad=0.0)
    dl = tmp_path / "dl.jsonl"
    p = sluice("score", "--model", "models/auth_anomaly", "--dead-letters", str(dl), stdin=b"\n".join(lines))
    assert p.returncode == 0
    recs = [orjson.loads(x) for x in p.stdout.splitlines()]
    assert len(recs) == 20 and recs[0]["source"] == {"topic": "stdin", "partition": 0, "offset": 3}
    dead = [json.loads(x) for x in dl.read_text().splitlines()]
    assert [(d["line"], d["reason"]) for d in dead] == [(1, "missing_field"), (2, "bad_json")]


def test_score_unknown_backend_or_missing_file_fails_cleanly(tmp_path):
    p = sluice("score", "--model", "models/auth_anomaly", "--input", str(tmp_path / "nope.jsonl"))
    assert p.returncode == 2 and b"cannot read" in p.stderr
    p = sluice("score", "--model", "models/auth_anomaly", "--backend", "tensorrt", "--device", "cuda", stdin=b"")
    assert p.returncode == 2 and b"sluice[gpu]" in p.stderr


def test_bench_inference_json():
    p = sluice("bench-inference", "--model", "models/flow_classifier", "--batch-sizes", "1,64", "--seconds", "0.05", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert [r["batch_size"] for r in res["results"]] == [1, 64]
    assert all(r["rows_per_s"] > 0 and r["latency_ms_p99"] >= r["latency_ms_p50"] > 0 for r in res["results"])
    assert res["backend"]["name"] == "onnxruntime"


# ---- auth telemetry


def test_auth_events_are_schema_valid_keyed_by_user_and_deterministic():
    schema = json.loads((ROOT / "schemas/events/auth.json").read_text())
    v = jsonschema.Draft202012Validator(schema)
    recs = list(telemetry.generate("auth", 2000, seed=5, start_ts=1.79e9))
    assert recs == list(telemetry.generate("auth", 2000, seed=5, start_ts=1.79e9))
    for key, val, headers in recs:
        ev = orjson.loads(val)
        assert not list(v.iter_errors(ev))
        assert key == ev["user"].encode() and dict(headers)["sluice-event-kind"] == b"auth"
        assert ("failure_reason" in ev) == (ev["result"] == "failure")
    assert len({orjson.loads(v)["event_id"] for _, v, _ in recs}) == 2000


def test_auth_attacks_have_their_signatures():
    d = telemetry.generate_labelled("auth", 20_000, seed=3, attack_fraction=0.3)
    ev = [orjson.loads(v) for v in d.values]
    sub = d.subtype

    def col(k):
        return np.array([e.get(k) for e in ev], dtype=object)

    spray = sub == "password_spray"
    assert (col("result")[spray] == "failure").all() and (col("src_users_1h")[spray].astype(int) >= 17).all()
    assert (col("user_failures_1h")[spray].astype(int) <= 2).all()  # few tries per user: spraying, not brute force
    travel = sub == "impossible_travel"
    assert (col("geo_speed_kmh")[travel].astype(float) > 1000).all() and (col("result")[travel] == "success").all()
    legit = sub == "travel"
    assert (col("geo_speed_kmh")[legit].astype(float) < 1000).all()
    off = sub == "offhours_admin"
    hours = col("hour_local")[off].astype(int)
    assert (col("user_type")[off] == "admin").all() and ((hours <= 5) | (hours >= 22)).all()


def test_auth_defects_get_their_reasons_and_flow_stream_is_unchanged_by_the_new_kind():
    spec = ModelSpec.load(ROOT / "models" / "auth_anomaly")
    recs = [(v, dict(h)) for _, v, h in telemetry.generate("auth", 4000, seed=11, bad_fraction=0.3)]
    bad = [(v, h[telemetry.DEFECT_HEADER].decode()) for v, h in recs if telemetry.DEFECT_HEADER in h]
    fb = Featurizer(spec).featurize([v for v, _ in bad])
    got = {r.position: r.reason for r in fb.rejects}
    assert [got.get(i) for i in range(len(bad))] == [r for _, r in bad]
    assert {r for _, r in bad} == set(telemetry.DEFECTS.values())
    # flow keeps its own stream (kind_no 0): the first flow event of seed 1 is what it always was
    first = orjson.loads(next(iter(telemetry.generate("flow", 1, seed=1, start_ts=0.0)))[1])
    assert first["event_id"] == "139e812f-57b2-4157-be20-962700000001"
