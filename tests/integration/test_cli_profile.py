"""`sluice run --profile DIR` end to end: a real worker on the broker, stopped by SIGTERM, leaves
a sampling profile of its orchestrator and of each of its scoring processes."""

from __future__ import annotations

import signal
import subprocess
import sys

import orjson

from workers.exit_codes import ExitCode
from workers.kafka.telemetry_producer import produce_telemetry

from . import worker_harness
from .worker_harness import ROOT, outcome, wait_until, worker_env

EVENTS = 20_000
SCORING_PROCESSES = 2


def _log_records(path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass
    return out


def test_run_profile_writes_the_orchestrators_and_each_scoring_processs_profile(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=2, prefix="prof")
    out = tmp_path / "profile"
    env = worker_env(bootstrap, topic, replica="prof", group=f"g-{topic}",
                     SLUICE_INFERENCE__PROCESSES=str(SCORING_PROCESSES))
    env.pop("SLUICE_PROFILE_DIR", None)  # the flag alone must do it
    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "run", "--profile", str(out)],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    worker_harness._STARTED.append(proc)  # killed by the conftest if the test fails half-way
    wait_until(lambda: any(r.get("msg") == "worker started" for r in _log_records(log_path)) or proc.poll() is not None,
               timeout=120, what="the worker to start")
    assert proc.poll() is None, log_path.read_text()[-3000:]
    pids = next(r["pids"] for r in _log_records(log_path) if r.get("msg") == "scoring executors ready")
    assert len(pids) == SCORING_PROCESSES

    produce_telemetry(bootstrap, topic, count=EVENTS, seed=11)
    got = outcome(bootstrap, topic, EVENTS, timeout=120)
    assert len(got.scores) + len(got.dead_letters) == EVENTS

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == ExitCode.OK, log_path.read_text()[-3000:]

    files = sorted(p.name for p in out.iterdir())
    expected = {f"{name}{suffix}" for name in ["orchestrator", *(f"scoring-{pid}" for pid in pids)]
                for suffix in (".html", ".txt", ".speedscope.json")}
    assert expected <= set(files), files
    for name in expected:
        assert (out / name).stat().st_size > 0, name

    orchestrator = (out / "orchestrator.txt").read_text()
    # the orchestrator's loop and its start-up, by their modules in workers/
    assert "workers/pipeline.py" in orchestrator and "Pipeline.run" in orchestrator, orchestrator[:3000]
    assert "workers/cli.py" in orchestrator
    scored_somewhere = False
    for pid in pids:
        report = (out / f"scoring-{pid}.txt").read_text()
        assert f"sluice scoring-{pid} (pid {pid})" in report
        assert "serve  workers/inference/pipes.py" in report, report[:3000]
        scored_somewhere |= "BatchScorer.score  workers/scoring.py" in report
    # with two partitions' worth of batches, the scoring shows in the profiles (one process may
    # have been idle if batches are few; at least one scored)
    assert scored_somewhere
    written = [r for r in _log_records(log_path) if r.get("msg") == "profile written"]
    assert len(written) == 1 + SCORING_PROCESSES, written
