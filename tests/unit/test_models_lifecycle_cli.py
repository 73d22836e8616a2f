"""sluice models deploy | rollback | status | compare without a broker, and the lifecycle records' schemas.

Argument checks, the deployment each command would write (history, rollback chains), the
status report from hand-made audit records, compare's statistics on hand-made score and
shadow records, and deployment / audit / score records (with lineage) against schemas/records.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest

from workers import models_cli as mc
from workers.cli import build_parser, main
from workers.config import load_settings
from workers.control import Deployment, ModelRef, audit_record, initial_deployment, requester
from workers.exit_codes import ExitCode
from workers.records import ScoreEncoder

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas" / "records"
FLOW = ROOT / "models" / "flow_classifier"
AUTH = ROOT / "models" / "auth_anomaly"
WORKER = {"replica": "r1", "version": "0.1.0", "config_sha256": "c" * 64}

CONFIG = f"""
[kafka]
bootstrap_servers = "127.0.0.1:1"
group_id = "g1"

[[routes]]
name = "flows"
input_topics = ["flows"]
model = {{path = "{FLOW}"}}

[[routes]]
name = "auth"
input_topics = ["auth"]
scores = "auth-scores"
model = {{path = "{AUTH}"}}
"""


def _schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{name}.json").read_text()))


@pytest.fixture
def cfg_path(tmp_path) -> Path:
    p = tmp_path / "sluice.toml"
    p.write_text(CONFIG)
    return p


@pytest.fixture
def settings(cfg_path):
    return load_settings(cfg_path, environ={})


@pytest.fixture
def flow_v2(tmp_path) -> Path:
    """A copy of the flow model with another version (other artifacts, other sha256)."""
    dst = tmp_path / "flow_v2"
    shutil.copytree(FLOW, dst, ignore=shutil.ignore_patterns("__pycache__"))
    mf = dst / "manifest.toml"
    text = mf.read_text()
    assert 'version = "1.0.0"' in text
    mf.write_text(text.replace('version = "1.0.0"', 'version = "2.0.0"', 1))
    return dst


def _ref(path: Path) -> ModelRef:
    return ModelRef.from_folder(path)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("canary, fraction, message", [
    (None, 0.1, "--fraction needs --canary"),
    (Path("m"), None, "--canary needs --fraction"),
    (Path("m"), 0.0, "strictly between 0 and 1"),
    (Path("m"), 1.0, "strictly between 0 and 1"),
    (Path("m"), 1.5, "strictly between 0 and 1"),
    (Path("m"), math.nan, "strictly between 0 and 1"),
])
def test_canary_flags_are_checked(canary, fraction, message):
    with pytest.raises(mc.CommandError, match=message) as exc:
        mc.validate_deploy_args(canary, fraction)
    assert exc.value.code == ExitCode.CONFIG


def test_canary_flags_that_go_together():
    assert mc.validate_deploy_args(None, None) == 0.0
    assert mc.validate_deploy_args(Path("m"), 0.25) == 0.25


def test_unknown_route_names_the_known_ones(settings):
    assert mc.find_route(settings, "auth").scores == "auth-scores"
    assert mc.find_route(settings, "flows").scores == "scores"  # [topics] scores filled in
    with pytest.raises(mc.CommandError, match=r"--route 'dns'.*routes: flows, auth") as exc:
        mc.find_route(settings, "dns")
    assert exc.value.code == ExitCode.CONFIG


def test_single_model_config_is_one_route_named_after_the_folder(tmp_path):
    p = tmp_path / "one.toml"
    p.write_text(f'[kafka]\nbootstrap_servers = "x:1"\ninput_topics = ["flows"]\n[model]\npath = "{FLOW}"\n')
    s = load_settings(p, environ={})
    assert mc.find_route(s, "flow_classifier").input_topics == ["flows"]


def test_bad_model_folders_are_named_by_their_flag(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.toml").write_text("not = [toml")
    with pytest.raises(mc.CommandError, match=r"^--canary .*broken: not a usable model folder"):
        mc.load_model("--canary", tmp_path / "broken", None, None)
    with pytest.raises(mc.CommandError, match=r"^--shadow .*missing: not a usable model folder"):
        mc.load_model("--shadow", tmp_path / "missing", None, None)


def test_a_model_for_another_event_kind_is_refused(settings):
    route = mc.find_route(settings, "flows")
    mc.check_event_kind("--primary", _ref(FLOW), route)
    with pytest.raises(mc.CommandError, match=r"reads 'auth' events, but route 'flows' carries 'flow' events"):
        mc.check_event_kind("--shadow", _ref(AUTH), route)


@pytest.mark.parametrize("argv", [
    ["models", "deploy", "--config", "c", "--route", "r", "--primary", "p", "--fraction", "ten"],
    ["models", "deploy", "--config", "c", "--route", "r", "--primary", "p", "--check-events", "0"],
    ["models", "deploy", "--config", "c", "--route", "r", "--primary", "p", "--backend", "onnx"],
    ["models", "deploy", "--config", "c", "--route", "r"],  # --primary is required
    ["models", "status", "--config", "c", "--timeout", "-1"],
    ["models", "rollback", "--config", "c"],  # --route is required
])
def test_parser_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--route", "dns", "--primary", str(FLOW)], "--route 'dns': no such route"),
    (["--route", "flows", "--primary", "/nonexistent/model"], "--primary /nonexistent/model: not a usable model"),
    (["--route", "flows", "--primary", str(FLOW), "--fraction", "0.2"], "--fraction needs --canary"),
    (["--route", "flows", "--primary", str(FLOW), "--canary", str(FLOW), "--fraction", "1"], "strictly between"),
])
def test_deploy_user_errors_exit_2_before_any_broker_call(cfg_path, extra, message, capsys):
    # bootstrap 127.0.0.1:1 answers nothing: reaching the broker would be exit 75, not 2
    rc = main(["models", "deploy", "--config", str(cfg_path), "--no-check", "--timeout", "2", *extra])
    err = capsys.readouterr().err
    assert rc == ExitCode.CONFIG, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_unreachable_cluster_is_exit_75_in_one_line(cfg_path, capsys):
    rc = main(["models", "status", "--config", str(cfg_path), "--timeout", "1"])
    err = capsys.readouterr().err
    assert rc == ExitCode.TEMPFAIL
    assert "did not answer" in err and "127.0.0.1:1" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("values, expected", [
    (None, (None, {})),
    (["100"], (100, {})),
    (["flows:0:12", "flows:3:7"], (None, {("flows", 0): 12, ("flows", 3): 7})),
    (["5", "a.b-c:1:9"], (5, {("a.b-c", 1): 9})),
])
def test_since_offset_forms(values, expected):
    assert mc.parse_since(values) == expected


@pytest.mark.parametrize("bad", ["-1", "flows:x:1", "flows:0", ":0:1", "flows:0:-3", "1.5"])
def test_since_offset_errors(bad):
    with pytest.raises(mc.CommandError, match="--since-offset"):
        mc.parse_since([bad])


# ----------------------------------------------------------------------------- deployments and history


def test_first_deploy_supersedes_the_configured_model(settings, flow_v2):
    route = mc.find_route(settings, "flows")
    dep, warning = mc.plan_deploy(settings, route, None, primary=_ref(flow_v2), reason="retrain",
                                  requested_by=requester("sluice models deploy"))
    assert warning == ""
    config = initial_deployment("g1", "flows", FLOW, "onnxruntime", "cpu")
    assert dep.supersedes == config.id and dep.supersedes.startswith("flows@config-")
    assert [h["deployment"] for h in dep.history] == [config.id]
    assert dep.history[0]["kind"] == "config" and dep.history[0]["primary"]["sha256"] == _ref(FLOW).sha256
    assert dep.key == b"g1/flows" and dep.kind == "deploy" and dep.reason == "retrain"
    assert dep.requested_by["tool"] == "sluice models deploy"
    assert dep.primary.version == "2.0.0" and dep.primary.sha256 != _ref(FLOW).sha256
    # ... so the first rollback returns to the configured model
    back = mc.plan_rollback("flows", Deployment.decode(dep.encode()), reason="bad")
    assert back.kind == "rollback" and back.primary.sha256 == _ref(FLOW).sha256
    assert back.supersedes == dep.id and back.id not in (dep.id, config.id)
    with pytest.raises(mc.CommandError, match="nothing to roll back to"):
        mc.plan_rollback("flows", back)


def test_rollbacks_walk_the_history_back(settings, flow_v2):
    route = mc.find_route(settings, "flows")
    a, _ = mc.plan_deploy(settings, route, None, primary=_ref(flow_v2))
    b, _ = mc.plan_deploy(settings, route, a, primary=_ref(FLOW), canary=_ref(flow_v2), fraction=0.2,
                          shadow=(_ref(flow_v2),))
    c, _ = mc.plan_deploy(settings, route, b, primary=_ref(FLOW))
    assert [h["deployment"] for h in c.history] == [b.id, a.id, a.supersedes]
    # what a replica reads back from the topic is what was written
    c = Deployment.decode(c.encode())
    r1 = mc.plan_rollback("flows", c)
    assert (r1.primary, r1.canary, r1.fraction, r1.shadow) == (b.primary, b.canary, 0.2, b.shadow)
    r2 = mc.plan_rollback("flows", r1)
    assert r2.primary.version == "2.0.0" and r2.canary is None
    r3 = mc.plan_rollback("flows", r2)
    assert r3.primary.sha256 == _ref(FLOW).sha256
    with pytest.raises(mc.CommandError):
        mc.plan_rollback("flows", r3)


def test_nothing_on_the_control_topic_is_nothing_to_roll_back():
    with pytest.raises(mc.CommandError, match="route 'auth' has no deployment on the control topic") as exc:
        mc.plan_rollback("auth", None)
    assert exc.value.code == ExitCode.CONFIG


def test_an_unreadable_configured_model_leaves_no_predecessor_and_says_so(tmp_path, flow_v2):
    p = tmp_path / "elsewhere.toml"
    p.write_text(CONFIG.replace(str(FLOW), "/opt/models/flow_classifier"))
    s = load_settings(p, environ={})
    dep, warning = mc.plan_deploy(s, mc.find_route(s, "flows"), None, primary=_ref(flow_v2))
    assert dep.history == () and dep.supersedes is None
    assert "/opt/models/flow_classifier cannot be read here" in warning and "rollback" in warning


def test_one_line_summary_starts_with_the_id(settings, flow_v2):
    dep, _ = mc.plan_deploy(settings, mc.find_route(settings, "flows"), None, primary=_ref(FLOW),
                            canary=_ref(flow_v2), fraction=0.1)
    line = mc._one_line(dep)
    assert line.split()[0] == dep.id
    assert "canary=flow_classifier@2.0.0(" in line and ")x0.1" in line


# ----------------------------------------------------------------------------- status


def _audit(event, dep, replica, at, **kw) -> dict:
    doc = orjson.loads(audit_record(event, dep, replica=replica, worker={**WORKER, "replica": replica}, **kw))
    doc["at"] = at
    return doc


def test_status_shows_desired_and_what_each_replica_runs(settings, flow_v2):
    route = mc.find_route(settings, "flows")
    config = initial_deployment("g1", "flows", FLOW, "onnxruntime", "cpu")
    new, _ = mc.plan_deploy(settings, route, None, primary=_ref(flow_v2), canary=_ref(FLOW), fraction=0.1)
    off = [("flows", 0, 10)]
    audits = [
        _audit("applied", config, "r1", 100.0, offsets=off),
        _audit("applied", config, "r2", 101.0, offsets=off),
        _audit("applied", new, "r1", 200.0, offsets=[("flows", 0, 500)]),
        _audit("applied", new, "r1", 260.0, offsets=[("flows", 1, 900)]),  # a partition assigned later
        _audit("refused", new, "r3", 210.0, error="ModelLoadError: boom", extra={"kept": config.id}),
        _audit("applied", replace(new, group="other"), "rX", 300.0, offsets=off),  # another group
    ]
    report = mc.status_report(settings, {"flows": new}, audits)
    json.dumps(report)  # --json prints it
    flows, auth = report["routes"]
    assert flows["source"] == "control" and flows["desired"]["deployment"] == new.id
    assert flows["desired"]["canary"]["fraction"] == 0.1 and flows["desired"]["primary"]["version"] == "2.0.0"
    reps = {r["replica"]: r for r in flows["replicas"]}
    assert set(reps) == {"r1", "r2"}
    assert reps["r1"]["deployment"] == new.id and reps["r1"]["on_desired"]
    assert reps["r1"]["since"] == 200.0 and reps["r1"]["last_seen"] == 260.0
    assert reps["r2"]["deployment"] == config.id and not reps["r2"]["on_desired"]
    assert flows["refusals"] == [{"replica": "r3", "at": 210.0, "error": "ModelLoadError: boom", "kept": config.id}]
    assert auth["source"] == "config" and auth["desired"]["deployment"].startswith("auth@config-")
    assert auth["replicas"] == []
    text = mc.format_status(report)
    assert f"desired: {new.id}" in text
    assert "r2" in text and "<- not on the desired deployment yet" in text.split("r2", 1)[1].splitlines()[0]
    assert "<- not" not in text.split("r1", 1)[1].splitlines()[0]
    assert "REFUSED by r3" in text and "canary   flow_classifier 1.0.0" in text


def test_status_lists_guard_rollbacks_of_the_desired_deployment(settings, flow_v2):
    route = mc.find_route(settings, "flows")
    canary_dep, _ = mc.plan_deploy(settings, route, None, primary=_ref(FLOW), canary=_ref(flow_v2), fraction=0.3)
    rollback = replace(canary_dep.without_canary(reason="canary guard: PSI 0.4 > max_psi 0.2",
                                                 requested_by={"replica": "r1", "tool": "sluice canary guard"}),
                       id=f"{canary_dep.id}~guard")
    audits = [_audit("guard_rollback", canary_dep, "r1", 50.0, reason="PSI 0.4 > max_psi 0.2",
                     extra={"rollback": rollback.id})]
    report = mc.status_report(settings, {"flows": rollback}, audits)
    g = report["routes"][0]["guard_rollbacks"]
    assert g == [{"replica": "r1", "at": 50.0, "deployment": canary_dep.id, "reason": "PSI 0.4 > max_psi 0.2",
                  "rollback": rollback.id}]
    assert "GUARD ROLLBACK" in mc.format_status(report)
    assert report["routes"][0]["desired"]["kind"] == "guard_rollback"


# ----------------------------------------------------------------------------- compare


def _score(offset, score, *, model=("m", "1", "a" * 64), role="primary", dep="d1", topic="flows", threshold=0.5,
           partition=0):
    return {"event_id": f"e{offset}", "score": score, "label": score >= threshold,
            "model": {"name": model[0], "version": model[1], "sha256": model[2]}, "role": role, "deployment": dep,
            "worker": WORKER, "source": {"topic": topic, "partition": partition, "offset": offset},
            "event_ts": 1.0, "scored_at": 2.0}


def test_compare_statistics_on_hand_made_records():
    shadow_model = ("m", "2", "b" * 64)
    ref = [0.1, 0.6, 0.9, 0.3, 0.05]
    sh = [0.2, 0.4, 0.95, 0.3]  # offset 4 has no shadow record
    scores = [_score(i, s) for i, s in enumerate(ref)]
    shadows = [_score(i, s, model=shadow_model, role="shadow") for i, s in enumerate(sh)]
    shadows.append(_score(99, 0.5, model=shadow_model, role="shadow"))  # no score record
    shadows.append(dict(shadows[0]))  # a duplicate (never with read_committed and exactly once)
    truth = {("flows", 0, 0): False, ("flows", 0, 1): True, ("flows", 0, 2): True, ("flows", 0, 3): True}
    rep = mc.compare_records(scores, shadows, topics={"flows"}, truth=truth)
    assert rep["scored"] == 5 and rep["shadow_records"] == 5
    assert rep["scores_without_shadow"] == 1 and rep["shadow_without_score"] == 1
    assert rep["duplicates"] == {"scores": 0, "shadow": 1}
    (p,) = rep["pairs"]
    assert p["model"] == {"name": "m", "version": "1", "sha256": "a" * 64, "roles": ["primary"]}
    assert p["shadow"]["version"] == "2" and p["events"] == 4
    assert p["label_agreement"] == pytest.approx(0.75)  # 0.6 vs 0.4 crosses the threshold
    assert p["mean_abs_diff"] == pytest.approx((0.1 + 0.2 + 0.05 + 0.0) / 4)
    assert p["max_abs_diff"] == pytest.approx(0.2)
    # PSI by hand: bins of 0.1; reference (served) [0.1 0.6 0.9 0.3] -> bins 1,6,9,3; shadow -> 2,4,9,3
    eps = 1e-4
    r = np.zeros(10); r[[1, 6, 9, 3]] = 0.25
    o = np.zeros(10); o[[2, 4, 9, 3]] = 0.25
    assert p["psi"] == pytest.approx(float(np.sum((o - r) * np.log((o + eps) / (r + eps)))))
    assert p["psi"] > 1.0  # two of four events moved bins: far from 0
    assert p["alert_rate"] == {"model": 0.5, "shadow": 0.25}
    # served labels [F T T F] and shadow labels [F F T F] against truth [F T T T]
    assert p["labelled"] == 4
    assert {k: p["confusion"]["model"][k] for k in "tp fp tn fn".split()} == {"tp": 2, "fp": 0, "tn": 1, "fn": 1}
    assert {k: p["confusion"]["shadow"][k] for k in "tp fp tn fn".split()} == {"tp": 1, "fp": 0, "tn": 1, "fn": 2}
    assert p["confusion"]["shadow"]["recall"] == pytest.approx(1 / 3)
    text = mc.format_compare({"routes": [{"route": "flows", "scores_topic": "s", "shadow_topic": "sh",
                                          "comparison": rep}]})
    assert "label agreement 75.00%" in text and "max |diff| 0.2000" in text and "tp 2 fp 0 tn 1 fn 1" in text


def test_identical_shadow_agrees_fully():
    scores = [_score(i, s) for i, s in enumerate([0.01, 0.49, 0.5, 0.99])]
    fp16 = ("m", "1+fp16", "c" * 64)
    shadows = [_score(i, s, model=fp16, role="shadow") for i, s in enumerate([0.01, 0.49, 0.5, 0.99])]
    (p,) = mc.compare_records(scores, shadows)["pairs"]
    assert p["label_agreement"] == 1.0 and p["max_abs_diff"] == 0.0 and p["psi"] == pytest.approx(0.0)


def test_compare_groups_pairs_by_exact_artifacts_and_filters():
    a, b = ("m", "1", "a" * 64), ("m", "1", "f" * 64)  # same name and version, other weights
    s1, s2 = ("s", "1", "1" * 64), ("s", "2", "2" * 64)
    scores = [_score(0, 0.2, model=a), _score(1, 0.7, model=b, dep="d2"), _score(2, 0.4, model=a, topic="auth"),
              _score(3, 0.9, model=a)]
    shadows = [_score(0, 0.2, model=s1, role="shadow"), _score(0, 0.3, model=s2, role="shadow"),
               _score(1, 0.7, model=s1, role="shadow", dep="d2"), _score(2, 0.4, model=s1, role="shadow", topic="auth"),
               _score(3, 0.1, model=s1, role="shadow")]
    rep = mc.compare_records(scores, shadows, topics={"flows"})
    keys = [(p["model"]["sha256"][0], p["shadow"]["version"], p["events"]) for p in rep["pairs"]]
    assert keys == [("a", "1", 2), ("a", "2", 1), ("f", "1", 1)]
    assert rep["scored"] == 3  # the auth record belongs to another route
    only = mc.compare_records(scores, shadows, topics={"flows"}, since=(None, {("flows", 0): 1}))
    assert [(p["model"]["sha256"][0], p["events"]) for p in only["pairs"]] == [("a", 1), ("f", 1)]
    d2 = mc.compare_records(scores, shadows, deployment="d2")
    assert [p["model"]["sha256"][0] for p in d2["pairs"]] == ["f"] and d2["scored"] == 1


def test_canary_against_primary_distributions():
    prim, can = ("m", "1", "a" * 64), ("m", "2", "b" * 64)
    scores = [_score(i, 0.1, model=prim, dep="dc") for i in range(6)]
    scores += [_score(6 + i, 0.9, model=can, role="canary", dep="dc") for i in range(2)]
    scores += [_score(20, 0.5, model=prim, dep="no-canary")]
    truth = {("flows", 0, i): i >= 6 for i in range(8)}
    rep = mc.compare_records(scores, [], truth=truth)
    (cp,) = rep["canary_vs_primary"]
    assert cp["deployment"] == "dc" and cp["canary_share"] == pytest.approx(0.25)
    assert cp["primary"]["events"] == 6 and cp["canary"]["events"] == 2
    assert cp["primary"]["alert_rate"] == 0.0 and cp["canary"]["alert_rate"] == 1.0
    assert cp["canary"]["mean_score"] == pytest.approx(0.9)
    assert cp["psi"] > 5  # all mass in bin 1 against all mass in bin 9
    assert cp["canary"]["confusion"]["tp"] == 2 and cp["primary"]["confusion"]["tn"] == 6
    assert rep["pairs"] == []


@pytest.mark.parametrize("value, expected", [
    ({"label": "benign"}, False), ({"label": "port_scan"}, True), ({"label": "Benign"}, False),
    ({"label": True}, True), ({"label": 0}, False), ({"label": None}, None), ({}, None), ([], None),
])
def test_ground_truth_from_the_event(value, expected):
    assert mc.ground_truth(value) is expected


def test_telemetry_labels_are_read_as_ground_truth():
    from workers import telemetry

    recs = list(telemetry.generate("flow", 400, seed=3, attack_fraction=0.3, with_labels=True))
    truth = [mc.ground_truth(orjson.loads(v)) for _, v, _ in recs]
    assert None not in truth and 0 < sum(truth) < len(truth)


def test_score_psi_without_data_is_none():
    assert mc.score_psi([], [0.5]) is None and mc.score_psi([0.5], []) is None
    assert mc.score_psi([1.0, 0.0], [1.0, 0.0]) == pytest.approx(0.0)  # 1.0 falls in the last bin


# ----------------------------------------------------------------------------- schemas


def test_deployment_records_match_the_schema(settings, flow_v2):
    v = _schema("deployment")
    route = mc.find_route(settings, "flows")
    a, _ = mc.plan_deploy(settings, route, None, primary=_ref(flow_v2), shadow=(_ref(FLOW),), reason="r",
                          requested_by=requester("sluice models deploy"))
    b, _ = mc.plan_deploy(settings, route, a, primary=_ref(FLOW), canary=_ref(flow_v2), fraction=0.05)
    guard = replace(b.without_canary(reason="canary guard: p99", requested_by={"replica": "r1", "tool": "guard"}),
                    id=f"{b.id}~guard")
    back = mc.plan_rollback("flows", b)
    for dep in (a, b, guard, back):
        doc = orjson.loads(dep.encode())
        errors = [e.message for e in v.iter_errors(doc)]
        assert not errors, (dep.kind, errors)
    assert orjson.loads(b.encode())["history"][1]["kind"] == "config"
    # the schema can fail
    doc = orjson.loads(b.encode())
    bad = [dict(doc, canary=dict(doc["canary"], fraction=1.0)), dict(doc, kind="promote"),
           dict(doc, primary=dict(doc["primary"], sha256="abc")), dict(doc, extra=1),
           dict(doc, history=[dict(doc["history"][0], history=[])]), {k: x for k, x in doc.items() if k != "primary"}]
    for d in bad:
        assert list(v.iter_errors(d)), d


def test_audit_records_match_the_schema(settings, flow_v2):
    v = _schema("audit")
    dep, _ = mc.plan_deploy(settings, mc.find_route(settings, "flows"), None, primary=_ref(FLOW),
                            canary=_ref(flow_v2), fraction=0.1, shadow=(_ref(flow_v2),))
    records = [
        audit_record("applied", dep, replica="r1", worker=WORKER, offsets=[("flows", 0, 5), ("flows", 1, 0)],
                     extra={"trigger": "switch", "previous": ["flows@config-x"]}),
        audit_record("refused", dep, replica="r1", worker=WORKER, error="ValueError: sha256 differs",
                     extra={"kept": "flows@config-x"}),
        audit_record("guard_rollback", dep, replica="r1", worker=WORKER, reason="p99 > 20 ms",
                     extra={"rollback": f"{dep.id}~guard"}),
    ]
    for rec in records:
        doc = orjson.loads(rec)
        errors = [e.message for e in v.iter_errors(doc)]
        assert not errors, (doc["event"], errors)
    doc = orjson.loads(records[0])
    assert doc["models"]["canary"]["version"] == "2.0.0" and doc["fraction"] == 0.1
    assert list(v.iter_errors(dict(doc, offsets=[])))  # applied names where it applies from
    assert list(v.iter_errors(dict(doc, event="loaded")))
    refused = orjson.loads(records[1])
    del refused["error"]
    assert list(v.iter_errors(refused))


def test_score_records_with_lineage_match_the_schema():
    v = _schema("score")
    ids = ["a", "b"]
    args = (ids, np.array([0.2, 0.8], np.float32), "flows", [0, 0], [7, 8], np.array([1.0, math.nan]), 3.0)
    for role in ("primary", "canary", "shadow"):
        enc = ScoreEncoder("flow_classifier", "1.0.0", 0.5, sha256="d" * 64, role=role, deployment="flows-x",
                           worker=WORKER)
        for rec in enc.encode(*args):
            doc = orjson.loads(rec)
            assert not [e.message for e in v.iter_errors(doc)], doc
            assert doc["role"] == role and doc["model"]["sha256"] == "d" * 64 and doc["worker"] == WORKER
    # records without lineage (sluice score, offline) stay valid
    plain = orjson.loads(ScoreEncoder("flow_classifier", "1.0.0", 0.5).encode(*args)[0])
    assert not list(v.iter_errors(plain)) and "role" not in plain
    # lineage is all or nothing, and the role is one of three
    lin = orjson.loads(ScoreEncoder("m", "1", 0.5, sha256="d" * 64, role="primary", deployment="x",
                                    worker=WORKER).encode(*args)[0])
    assert list(v.iter_errors(dict(lin, role="champion")))
    assert list(v.iter_errors({k: x for k, x in lin.items() if k != "deployment"}))
    assert list(v.iter_errors(dict(lin, model={"name": "m", "version": "1"})))
    assert list(v.iter_errors(dict(lin, worker={"replica": "r1"})))
