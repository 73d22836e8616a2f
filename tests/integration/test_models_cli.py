"""sluice models deploy | rollback | status | compare against a broker, through the real command.

Each test has its own group, control, audit, shadow and scores topics, so they share the
session's broker without seeing each other's records. (Replicas following the control topic
are tested end to end elsewhere; here the records are the workers' side.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from workers import telemetry
from workers.config import load_settings
from workers.control import ModelRef, audit_record
from workers.exit_codes import ExitCode
from workers.lifecycle import read_deployments

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "models" / "flow_classifier"
SCHEMA = json.loads((ROOT / "schemas" / "records" / "deployment.json").read_text())
WORKER = {"replica": "r1", "version": "0.1.0", "config_sha256": "c" * 64}


def sluice(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture
def env(tmp_path, bootstrap, new_topic):
    """A config with one flow route on a fresh input topic, and its own lifecycle topics."""
    tag = uuid.uuid4().hex[:8]
    flows = new_topic(prefix="flows")
    cfg = tmp_path / "sluice.toml"
    cfg.write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "g-{tag}"

[topics]
scores = "scores-{tag}"
control = "control-{tag}"
audit = "audit-{tag}"
shadow = "shadow-{tag}"

[[routes]]
name = "flows"
input_topics = ["{flows}"]
model = {{path = "{FLOW}"}}
""")
    v2 = tmp_path / "flow_v2"
    shutil.copytree(FLOW, v2, ignore=shutil.ignore_patterns("__pycache__"))
    mf = v2 / "manifest.toml"
    mf.write_text(mf.read_text().replace('version = "1.0.0"', 'version = "2.0.0"', 1))

    class Env:
        config = str(cfg)
        settings = load_settings(cfg, environ={})
        input_topic = flows
        model_v2 = v2

    return Env


def _deploy(env, *extra: str) -> dict:
    p = sluice("models", "deploy", "--config", env.config, "--route", "flows", "--json", *extra)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _status(env) -> dict:
    p = sluice("models", "status", "--config", env.config, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_deploy_then_status_shows_the_desired_deployment(env, bootstrap):
    out = _deploy(env, "--primary", str(FLOW), "--canary", str(env.model_v2), "--fraction", "0.2",
                  "--shadow", str(env.model_v2), "--reason", "weekly retrain")
    v2 = ModelRef.from_folder(env.model_v2)
    assert out["canary"]["sha256"] == v2.sha256 and out["canary"]["fraction"] == 0.2
    assert out["supersedes"].startswith("flows@config-")

    # on the control topic: one record, keyed group/route, valid, compacted topic
    deps = read_deployments(env.settings, timeout=20)
    dep = deps["flows"]
    assert dep.id == out["deployment"] and dep.key == f"{env.settings.kafka.group_id}/flows".encode()
    jsonschema.validate(orjson.loads(dep.encode()), SCHEMA)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, env.settings.topics.control)
    configs = admin.describe_configs([res])[res].result(20)
    assert configs["cleanup.policy"].value == "compact"
    md = admin.list_topics(env.settings.topics.control, timeout=20)
    assert len(md.topics[env.settings.topics.control].partitions) == 1

    status = _status(env)
    (route,) = status["routes"]
    assert route["source"] == "control" and route["desired"]["deployment"] == dep.id
    assert route["desired"]["reason"] == "weekly retrain"
    assert [m["version"] for m in route["desired"]["shadow"]] == ["2.0.0"]
    assert route["replicas"] == []  # no worker ran

    text = sluice("models", "status", "--config", env.config)
    assert text.returncode == 0 and f"desired: {dep.id} (deploy" in text.stdout
    assert "x0.2" in text.stdout and "weekly retrain" in text.stdout


def test_rollback_restores_the_previous_deployment(env):
    first = _deploy(env, "--primary", str(env.model_v2), "--no-check")
    second = _deploy(env, "--primary", str(FLOW), "--shadow", str(env.model_v2), "--no-check")
    assert second["supersedes"] == first["deployment"]
    assert second["history"] == [first["deployment"], first["supersedes"]]

    p = sluice("models", "rollback", "--config", env.config, "--route", "flows", "--reason", "shadow too slow")
    assert p.returncode == 0, p.stderr
    rolled = p.stdout.split()[0]
    desired = _status(env)["routes"][0]["desired"]
    assert desired["deployment"] == rolled and desired["kind"] == "rollback"
    assert desired["primary"]["version"] == "2.0.0" and desired["shadow"] == []
    assert desired["supersedes"] == second["deployment"] and desired["reason"] == "shadow too slow"

    # back again: the configured model; then there is nothing left
    assert sluice("models", "rollback", "--config", env.config, "--route", "flows").returncode == 0
    desired = _status(env)["routes"][0]["desired"]
    assert desired["primary"]["sha256"] == ModelRef.from_folder(FLOW).sha256 and desired["history"] == []
    p = sluice("models", "rollback", "--config", env.config, "--route", "flows")
    assert p.returncode == ExitCode.CONFIG and "nothing to roll back to" in p.stderr


def test_a_broken_model_folder_is_refused_with_exit_2_and_nothing_written(env, tmp_path):
    broken = tmp_path / "flow_broken"
    shutil.copytree(FLOW, broken, ignore=shutil.ignore_patterns("__pycache__"))
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    p = sluice("models", "deploy", "--config", env.config, "--route", "flows", "--primary", str(broken))
    assert p.returncode == ExitCode.CONFIG, p.stderr
    assert "--primary" in p.stderr and "fails `sluice models check`" in p.stderr and "onnx" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert read_deployments(env.settings, timeout=20) == {}


def test_status_reads_what_each_replica_applied_from_the_audit_topic(env, bootstrap):
    out = _deploy(env, "--primary", str(env.model_v2), "--no-check")
    dep = read_deployments(env.settings, timeout=20)["flows"]
    config_id = out["supersedes"]
    from dataclasses import replace

    config = replace(dep, id=config_id, kind="config")
    prod = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    topic = env.settings.topics.audit
    for rec in (audit_record("applied", config, replica="r1", worker=WORKER, offsets=[(env.input_topic, 0, 0)]),
                audit_record("applied", config, replica="r2", worker=WORKER, offsets=[(env.input_topic, 0, 0)]),
                audit_record("applied", dep, replica="r1", worker=WORKER, offsets=[(env.input_topic, 0, 40)]),
                audit_record("refused", dep, replica="r2", worker=WORKER, error="ModelLoadFailed: no GPU")):
        prod.produce(topic, rec, dep.key)
    assert prod.flush(20) == 0
    status = _status(env)
    reps = {r["replica"]: r for r in status["routes"][0]["replicas"]}
    assert reps["r1"]["deployment"] == dep.id and reps["r1"]["on_desired"]
    assert reps["r2"]["deployment"] == config_id and not reps["r2"]["on_desired"]
    assert [f["replica"] for f in status["routes"][0]["refusals"]] == ["r2"]
    text = sluice("models", "status", "--config", env.config).stdout
    assert "not on the desired deployment yet" in text and "REFUSED by r2" in text and "no GPU" in text


def _score(topic: str, offset: int, score: float, model: tuple[str, str], role: str) -> bytes:
    return orjson.dumps({
        "event_id": f"e{offset}", "score": score, "label": score >= 0.5,
        "model": {"name": "flow_classifier", "version": model[0], "sha256": model[1]}, "role": role,
        "deployment": "flows-test", "worker": WORKER, "source": {"topic": topic, "partition": 0, "offset": offset},
        "event_ts": 1.0, "scored_at": 2.0})


def test_compare_on_hand_produced_records(env, bootstrap):
    s = env.settings
    v1, v2 = ("1.0.0", "a" * 64), ("2.0.0", "b" * 64)
    # input events with ground truth, at offsets 0..7 of the route's input topic
    prod = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    events = [v for _, v, _ in telemetry.generate("flow", 8, seed=11, attack_fraction=0.5, with_labels=True)]
    for v in events:
        prod.produce(env.input_topic, v, b"k")
    assert prod.flush(20) == 0
    truth = [orjson.loads(v)["label"] != "benign" for v in events]

    served = [0.1, 0.2, 0.8, 0.9, 0.3, 0.7, 0.05, 0.6]
    shadow = [0.1, 0.6, 0.8, 0.95, 0.3, 0.7, 0.05, 0.4]  # offsets 1 and 7 cross the threshold
    # as a worker writes them: in transactions; an aborted one must not count
    tx = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"cmp-{uuid.uuid4().hex[:6]}"})
    tx.init_transactions(20)
    tx.begin_transaction()
    for off in range(8):
        tx.produce(s.topics.scores, _score(env.input_topic, off, served[off], v1, "primary"), b"k")
        tx.produce(s.topics.shadow, _score(env.input_topic, off, shadow[off], v2, "shadow"), b"k")
    tx.commit_transaction(20)
    tx.begin_transaction()
    tx.produce(s.topics.shadow, _score(env.input_topic, 0, 0.99, v2, "shadow"), b"k")  # aborted: never read
    tx.flush(20)
    tx.abort_transaction(20)

    p = sluice("models", "compare", "--config", env.config, "--route", "flows", "--labels-from-input", "--json",
               "--timeout", "60")
    assert p.returncode == 0, p.stderr
    c = json.loads(p.stdout)["routes"][0]["comparison"]
    assert c["scored"] == 8 and c["shadow_records"] == 8 and c["duplicates"] == {"scores": 0, "shadow": 0}
    (pair,) = c["pairs"]
    assert pair["events"] == 8 and pair["label_agreement"] == pytest.approx(6 / 8)
    assert pair["max_abs_diff"] == pytest.approx(0.4)
    assert pair["mean_abs_diff"] == pytest.approx((0.4 + 0.05 + 0.2) / 8)
    assert pair["labelled"] == 8
    served_labels = [x >= 0.5 for x in served]
    tp = sum(1 for p_, t in zip(served_labels, truth) if p_ and t)
    assert pair["confusion"]["model"]["tp"] == tp
    assert sum(pair["confusion"]["shadow"][k] for k in ("tp", "fp", "tn", "fn")) == 8

    # only events from offset 4 on
    p = sluice("models", "compare", "--config", env.config, "--since-offset", f"{env.input_topic}:0:4", "--json")
    pair = json.loads(p.stdout)["routes"][0]["comparison"]["pairs"][0]
    assert pair["events"] == 4 and pair["label_agreement"] == pytest.approx(3 / 4)
    text = sluice("models", "compare", "--config", env.config).stdout
    assert "label agreement 75.00%" in text and "shadow flow_classifier 2.0.0 (bbbbbbbbbbbb)" in text
