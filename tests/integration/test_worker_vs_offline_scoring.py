"""Each model through the worker: streaming scores equal `sluice score` on the same events."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from workers.control import artifacts_sha256
from workers.kafka.telemetry_producer import produce_telemetry

from .worker_harness import ROOT, WorkerProc, assert_exactly_once, outcome, partition_ends, read_all, worker_env

MODELS = {"auth": ROOT / "models" / "auth_anomaly", "flow": ROOT / "models" / "flow_classifier"}


def _strip(rec: dict) -> dict:
    """The record without what differs by design: when and where it was scored, and the live
    worker's lineage (offline scoring has no deployment, role or worker; the digest is checked
    against the model folder instead)."""
    out = {k: v for k, v in rec.items() if k not in ("scored_at", "source", "role", "deployment", "worker")}
    out["model"] = {k: v for k, v in rec["model"].items() if k != "sha256"}
    return out


@pytest.mark.parametrize("kind", ["auth", "flow"])
def test_worker_scores_events_like_offline_scoring(bootstrap, new_topic, tmp_path, kind):
    model = MODELS[kind]
    topic = new_topic(partitions=2, prefix=kind)
    n = produce_telemetry(bootstrap, topic, kind=kind, count=3000, seed=2026, bad_fraction=0.02)
    assert n == 3000
    env = worker_env(bootstrap, topic, replica=f"{kind}-1", group=f"{topic}-g", SLUICE_MODEL__PATH=str(model))
    w = WorkerProc(env, tmp_path / "worker.log").start()
    try:
        w.wait_started()
        ends = partition_ends(bootstrap, topic, 2)
        out = outcome(bootstrap, topic, expected=sum(ends.values()))
    finally:
        assert w.terminate() == 0, w.log()[-3000:]
    assert_exactly_once(out, topic, ends)
    streamed = {orjson.loads(m.value())["event_id"]: orjson.loads(m.value()) for m in out.scores}
    assert {r["model"]["name"] for r in streamed.values()} == {model.name}
    assert {r["model"]["sha256"] for r in streamed.values()} == {artifacts_sha256(model)}
    assert {r["role"] for r in streamed.values()} == {"primary"}

    # the same input records, as JSON lines, through `sluice score`: byte-identical records
    # apart from scored_at and source
    inputs = read_all(bootstrap, topic, min_count=sum(ends.values()))
    path = tmp_path / f"{kind}.jsonl"
    path.write_bytes(b"\n".join((m.value() or b"").replace(b"\n", b" ") for m in inputs) + b"\n")
    proc = subprocess.run([sys.executable, "-m", "workers", "score", "--model", str(model), "--input", str(path),
                           "--dead-letters", str(tmp_path / "dl.jsonl")], capture_output=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    offline = {r["event_id"]: r for r in map(orjson.loads, proc.stdout.splitlines())}
    assert set(offline) == set(streamed)
    diff = [(eid, offline[eid]["score"], streamed[eid]["score"]) for eid in streamed
            if _strip(offline[eid]) != _strip(streamed[eid])]
    assert not diff, f"{len(diff)} of {len(streamed)} records differ, e.g. {diff[:3]}"
    # the worker's dead letters are the offline dead letters, same reasons (a tombstone has no
    # JSON-lines form: it was written as an empty line, which is bad JSON offline)
    dl = [orjson.loads(x) for x in (tmp_path / "dl.jsonl").read_bytes().splitlines()]
    worker_reasons = sorted("bad_json" if r == "tombstone" else r for r in out.reasons().elements())
    assert sorted(d["reason"] for d in dl) == worker_reasons
