"""Live deployments through real workers and a real broker: deploy, canary, shadow, rollback, guard.

Each test checks, from the committed topics alone (read_committed, as a SIEM reads them):
every input offset has exactly one primary-or-canary output or dead letter, every event
scored under a deployment with a shadow model has exactly one shadow record, the canary's
share and its choice of events (deterministic by event id, so replays keep their model), and
that every output's lineage is the deployment the audit topic says was in force at its offset.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import orjson
from confluent_kafka import Producer

from workers.control import Deployment, ModelRef, initial_deployment
from workers.kafka.telemetry_producer import produce_telemetry

from .worker_harness import (
    MODEL,
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

PARTITIONS = 4


class _Feeder:
    """Produces telemetry at a steady rate until stopped: the stream outlasts every phase of a test."""

    def __init__(self, bootstrap, topic, rate, seed, bad_fraction=0.0):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=produce_telemetry, args=(bootstrap, topic), daemon=True, kwargs={
            "count": 10_000_000, "rate": rate, "seed": seed, "bad_fraction": bad_fraction, "stop": self.stop})
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def _copy_model(src: Path, dst: Path, version: str) -> Path:
    """A copy of a shipped model under another version (a retrain as far as lineage goes)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    mf = dst / "manifest.toml"
    text = mf.read_text()
    old = next(line for line in text.splitlines() if line.startswith("version"))
    mf.write_text(text.replace(old, f'version = "{version}"', 1))
    return dst



def _deploy(bootstrap, topic, config_env, *args) -> str:
    """`sluice models deploy|rollback ...` as an operator runs it; the deployment id it wrote."""
    env = dict(config_env)
    config = Path(env["SLUICE_TEST_CONFIG_DIR"]) / "sluice.toml"
    config.write_text("# every setting comes from the SLUICE_* environment of the workers\n")
    cmd, *rest = args
    proc = subprocess.run([sys.executable, "-m", "workers", "models", cmd, "--config", str(config), *rest, "--json"],
                          env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return orjson.loads(proc.stdout)["deployment"]


def _write_control(bootstrap, control_topic, dep: Deployment) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    p.produce(control_topic, dep.encode(), dep.key)
    assert p.flush(30) == 0


def _audits(bootstrap, topic) -> list[dict]:
    return [orjson.loads(m.value()) for m in read_all(bootstrap, f"{topic}-audit", timeout=10, idle=1.0)]


def _applied(bootstrap, topic, deployment: str, replicas: set[str]) -> bool:
    got = {a["replica"] for a in _audits(bootstrap, topic) if a["event"] == "applied" and a["deployment"] == deployment}
    return replicas <= got


def _in_force(audits: list[dict]):
    """(topic, partition) -> sorted [(first offset, commit order, deployment)] of `applied` audits."""
    table = defaultdict(list)
    for order, a in enumerate(audits):
        if a["event"] != "applied":
            continue
        for o in a["offsets"]:
            table[(o["topic"], o["partition"])].append((o["offset"], order, a["deployment"]))
    for v in table.values():
        v.sort()
    return table


def _deployment_at(table, tp, offset) -> str | None:
    best = None
    for first, _, dep in table.get(tp, ()):
        if first <= offset:
            best = dep
        else:
            break
    return best


def _check_lineage(scores, shadows, audits, deps: dict[str, Deployment]):
    """Every output's deployment is the one in force at its offset; roles, digests, canary choice."""
    table = _in_force(audits)
    by_dep = Counter()
    wrong = []
    for m in scores:
        r = orjson.loads(m.value())
        src = r["source"]
        want = _deployment_at(table, (src["topic"], src["partition"]), src["offset"])
        if r["deployment"] != want:
            wrong.append((src, r["deployment"], want))
            continue
        dep = deps[r["deployment"]]
        by_dep[(r["deployment"], r["role"])] += 1
        canary = dep.canary is not None and zlib.crc32(r["event_id"].encode()) < int(dep.fraction * 2**32)
        assert r["role"] == ("canary" if canary else "primary"), r
        ref = dep.canary if canary else dep.primary
        assert r["model"] == ref.lineage(), (r["model"], ref)
        assert set(r["worker"]) == {"replica", "version", "config_sha256"}
    assert not wrong, f"{len(wrong)} outputs whose deployment is not the one in force at their offset: {wrong[:3]}"
    return by_dep


def test_deploy_canary_shadow_then_rollback_during_a_stream_with_sigkills(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=PARTITIONS, prefix="life")
    group = f"g-{topic}"
    v2 = _copy_model(MODEL, tmp_path / "flow_v2", "1.1.0")
    shadow = _copy_model(MODEL, tmp_path / "flow_shadow", "2.0.0")
    feeder = _Feeder(bootstrap, topic, rate=800, seed=21, bad_fraction=0.01)
    ws = {r: WorkerProc(worker_env(bootstrap, topic, replica=r, group=group), tmp_path / f"{r}.log").start() for r in ("a", "b")}
    for w in ws.values():
        w.wait_started()
    route = "flow_classifier"
    env = worker_env(bootstrap, topic, replica="operator", group=group, SLUICE_TEST_CONFIG_DIR=str(tmp_path))
    wait_until(lambda: sum(committed_offsets(bootstrap, group, topic, PARTITIONS).values()) > 3000, 60,
               what="first commits under the configured model")
    d1 = _deploy(bootstrap, topic, env, "deploy", "--route", route, "--primary", str(MODEL), "--canary", str(v2),
                 "--fraction", "0.3", "--shadow", str(shadow), "--reason", "try v2")
    # SIGKILL one replica while the others load and switch; it restarts into the new deployment.
    time.sleep(2.0)
    ws["a"].kill()
    ws["a"].start()
    wait_until(lambda: _applied(bootstrap, topic, d1, {"a", "b"}), 120,
               what=f"both replicas to apply {d1}:\n" + "\n".join(w.log()[-2000:] for w in ws.values()))
    base = sum(committed_offsets(bootstrap, group, topic, PARTITIONS).values())
    wait_until(lambda: sum(committed_offsets(bootstrap, group, topic, PARTITIONS).values()) > base + 6000, 120,
               what="outputs under the canary deployment")
    d2 = _deploy(bootstrap, topic, env, "rollback", "--route", route, "--reason", "v2 not better")
    wait_until(lambda: _applied(bootstrap, topic, d2, {"a", "b"}), 120, what=f"both replicas to apply {d2}")
    ws["b"].kill()
    ws["b"].start()
    time.sleep(3.0)
    feeder.finish()
    ends = partition_ends(bootstrap, topic, PARTITIONS)
    total = sum(ends.values())
    wait_until(lambda: sum(committed_offsets(bootstrap, group, topic, PARTITIONS).values()) == total, 120,
               what="every input offset committed")
    for w in ws.values():
        w.wait_started()
        assert w.terminate() == 0, w.log()[-3000:]

    out = outcome(bootstrap, topic, total)
    assert_exactly_once(out, topic, ends)
    control = {orjson.loads(m.value())["deployment"]: Deployment.decode(m.value())
               for m in read_all(bootstrap, f"{topic}-control", timeout=10)}
    initial = initial_deployment(group, route, MODEL, "onnxruntime", "cpu")
    deps = {**control, initial.id: initial}
    assert set(control) == {d1, d2}
    # The rollback restores what ran before d1: the route's configured model, no canary, no shadow.
    assert control[d2].primary.lineage() == initial.primary.lineage()
    assert control[d2].canary is None and not control[d2].shadow and control[d2].supersedes == d1
    audits = _audits(bootstrap, topic)
    by_dep = _check_lineage(out.scores, [], audits, deps)
    canary, primary = by_dep[(d1, "canary")], by_dep[(d1, "primary")]
    assert canary + primary > 4000, by_dep
    share = canary / (canary + primary)
    assert abs(share - 0.3) < 0.04, f"canary share {share:.3f} for fraction 0.3 ({by_dep})"
    assert by_dep[(d2, "primary")] > 0 and by_dep[(initial.id, "primary")] > 0, by_dep

    # Shadow: exactly one shadow record for every event scored under d1, none for any other.
    shadows = read_all(bootstrap, f"{topic}-shadow", timeout=30)
    shadow_src = Counter()
    for m in shadows:
        r = orjson.loads(m.value())
        assert r["role"] == "shadow" and r["deployment"] == d1 and r["model"] == ModelRef.from_folder(shadow).lineage()
        shadow_src[(r["source"]["partition"], r["source"]["offset"])] += 1
    d1_src = Counter((orjson.loads(m.value())["source"]["partition"], orjson.loads(m.value())["source"]["offset"])
                     for m in out.scores if orjson.loads(m.value())["deployment"] == d1)
    assert max(shadow_src.values()) == 1
    assert set(shadow_src) == set(d1_src), (len(shadow_src), len(d1_src))

    # The switch's stall, for the closing note: from warm pool to first output of the deployment.
    for w in ws.values():
        print(f"switch stall replica log: {[ln for ln in w.log().splitlines() if 'deployment loaded' in ln][-1:]}")


def test_canary_guard_rolls_a_bad_canary_back_for_every_replica(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=2, prefix="guard")
    group = f"g-{topic}"
    bad = _copy_model(MODEL, tmp_path / "flow_bad", "9.9.9")
    feeder = _Feeder(bootstrap, topic, rate=800, seed=22)
    guard = {"SLUICE_GUARD__MAX_PSI": "0.5", "SLUICE_GUARD__WINDOW_S": "30", "SLUICE_GUARD__MIN_EVENTS": "300"}
    ws = {r: WorkerProc(worker_env(bootstrap, topic, replica=r, group=group, **guard), tmp_path / f"{r}.log").start() for r in ("a", "b")}
    for w in ws.values():
        w.wait_started()
    wait_until(lambda: sum(committed_offsets(bootstrap, group, topic, 2).values()) > 2000, 60, what="first commits")
    # A per-model backend is not a CLI flag: write the record as `models deploy` would.
    initial = initial_deployment(group, "flow_classifier", MODEL, "onnxruntime", "cpu")
    dep = initial.succeeded_by(primary=initial.primary, fraction=0.5, reason="a candidate that inverts every score",
                               canary=ModelRef.from_folder(bad, backend="tests.backends:InvertedOnnxRuntime"))
    _write_control(bootstrap, f"{topic}-control", dep)
    d1 = dep.id

    def rolled_back():
        return any(a["event"] == "guard_rollback" and a["deployment"] == d1 for a in _audits(bootstrap, topic))

    wait_until(rolled_back, 120, what="the guard to roll the canary back:\n" + ws["a"].log()[-3000:])
    wait_until(lambda: _applied(bootstrap, topic, f"{d1}~guard", {"a", "b"}), 120,
               what="both replicas to apply the guard's rollback")
    feeder.finish()
    ends = partition_ends(bootstrap, topic, 2)
    total = sum(ends.values())
    wait_until(lambda: sum(committed_offsets(bootstrap, group, topic, 2).values()) == total, 120,
               what="every input offset committed")
    for w in ws.values():
        assert w.terminate() == 0, w.log()[-3000:]
    out = outcome(bootstrap, topic, total)
    assert_exactly_once(out, topic, ends)
    control = [Deployment.decode(m.value()) for m in read_all(bootstrap, f"{topic}-control", timeout=10)]
    latest = control[-1]
    assert latest.id == f"{d1}~guard" and latest.kind == "guard_rollback" and latest.canary is None
    assert "PSI" in latest.reason
    audits = [a for a in _audits(bootstrap, topic) if a["event"] == "guard_rollback"]
    assert audits and "PSI" in audits[0]["reason"]
    deps = {d.id: d for d in control}
    deps[initial.id] = initial
    by_dep = _check_lineage(out.scores, [], _audits(bootstrap, topic), deps)
    assert by_dep[(d1, "canary")] > 0 and by_dep[(f"{d1}~guard", "primary")] > 0, by_dep
