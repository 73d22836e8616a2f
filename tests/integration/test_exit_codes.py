"""Every exit code of workers/exit_codes.py, each from a real `sluice` process against a real broker.

The codes are what a supervisor acts on (restart or not), so each is produced the way it
happens in production: a signal, a drain deadline, a bad variable, a fenced replica, a
scoring process that dies, a missing topic, Ctrl-C, a second signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.backends import DELAY_ENV
from workers.exit_codes import ExitCode
from workers.kafka.telemetry_producer import produce_telemetry

from .worker_harness import ROOT, WorkerProc, partition_ends, wait_until, worker_env

SLOW_BACKEND = "tests.backends:SlowOnnxRuntime"


def _log_records(worker: WorkerProc) -> list[dict]:
    out = []
    for line in worker.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass
    return out


def _metrics_port(worker: WorkerProc) -> int:
    wait_until(lambda: any(r.get("msg") == "metrics server listening" for r in _log_records(worker)),
               timeout=60, what="the metrics server")
    return next(r["port"] for r in _log_records(worker) if r.get("msg") == "metrics server listening")


def _gauge(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name:
                return s.value
    return float("nan")


def _feed(bootstrap: str, topic: str, count: int, rate: float, seed: int) -> threading.Thread:
    t = threading.Thread(target=produce_telemetry, args=(bootstrap, topic),
                         kwargs={"count": count, "rate": rate, "seed": seed}, daemon=True)
    t.start()
    return t


def _slow_worker(bootstrap, topic, tmp_path, name, **overrides) -> WorkerProc:
    """A worker whose every batch takes 3 s, with a batch in flight once it returns."""
    env = worker_env(bootstrap, topic, replica=name, group=f"g-{topic}",
                     SLUICE_MODEL__BACKEND=SLOW_BACKEND, SLUICE_INFERENCE__PROCESSES="0", **overrides)
    env[DELAY_ENV] = "3"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # tests.backends, by import path
    w = WorkerProc(env, tmp_path / f"{name}.log").start()
    w.wait_started()
    port = _metrics_port(w)
    _feed(bootstrap, topic, count=200, rate=1000, seed=3)
    wait_until(lambda: _gauge(port, "sluice_inflight_batches") >= 1, timeout=60, what="a batch in flight")
    return w


def test_0_ok_sigterm_drains_and_commits(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=1, prefix="ec0")
    w = WorkerProc(worker_env(bootstrap, topic, replica="ok", group=f"g-{topic}"), tmp_path / "w.log").start()
    w.wait_started()
    assert w.terminate() == ExitCode.OK, w.log()[-3000:]


def test_1_failure_drain_deadline_passed(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=1, prefix="ec1")
    w = _slow_worker(bootstrap, topic, tmp_path, "drain", SLUICE_TRANSACTIONS__SHUTDOWN_TIMEOUT_MS="100")
    assert w.terminate() == ExitCode.FAILURE, w.log()[-3000:]
    assert "shutdown forced, deadline passed" in w.log()


def test_2_config_malformed_environment_variable(bootstrap, tmp_path):
    env = worker_env(bootstrap, "any", replica="cfg", group="g-cfg")
    env["SLUICE_KAFKA__INPUT_TOPICS"] = "flows"  # not JSON
    env["SLUICE_KAFKA__CLIENT"] = '{"sasl.password": "hunter2"}'
    run = subprocess.run([sys.executable, "-m", "workers", "run", "--config", str(ROOT / "deploy" / "sluice.toml")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == ExitCode.CONFIG, run.stderr
    assert "SLUICE_KAFKA__INPUT_TOPICS: expected a JSON array" in run.stderr and "got 'flows'" in run.stderr
    assert "Traceback" not in run.stderr and "hunter2" not in run.stderr


def test_3_fenced_by_a_second_process_with_the_same_replica_id(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=1, prefix="ec3")
    env = worker_env(bootstrap, topic, replica="twin", group=f"g-{topic}")
    zombie = WorkerProc(env, tmp_path / "zombie.log").start()
    zombie.wait_started()
    feeder = _feed(bootstrap, topic, count=40_000, rate=2000, seed=4)  # transactions keep coming
    wait_until(lambda: '"partitions assigned"' in zombie.log(), timeout=60, what="assignment")
    successor = WorkerProc(env, tmp_path / "successor.log").start()
    wait_until(lambda: not zombie.alive(), timeout=90, what="the zombie to be fenced")
    assert zombie.proc.returncode == ExitCode.FENCED, zombie.log()[-3000:]
    successor.wait_started()
    successor.terminate()
    feeder.join(60)


def test_70_software_a_scoring_process_died(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=1, prefix="ec70")
    w = WorkerProc(worker_env(bootstrap, topic, replica="sw", group=f"g-{topic}"), tmp_path / "w.log").start()
    w.wait_started()
    ready = next(r for r in _log_records(w) if r.get("msg") == "scoring executors ready")
    os.kill(ready["pids"][0], signal.SIGKILL)
    _feed(bootstrap, topic, count=5000, rate=2000, seed=5)  # the next batch finds it gone
    wait_until(lambda: not w.alive(), timeout=60, what="the worker to notice the dead scoring process")
    assert w.proc.returncode == ExitCode.SOFTWARE, w.log()[-3000:]


def test_75_tempfail_input_topic_missing(bootstrap, tmp_path):
    env = worker_env(bootstrap, "no-such-topic-ec75", replica="tmp", group="g-ec75")
    run = subprocess.run([sys.executable, "-m", "workers", "run"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == ExitCode.TEMPFAIL, run.stderr[-3000:]
    assert "no-such-topic-ec75" in run.stderr and bootstrap in run.stderr


def test_130_interrupted_produce(bootstrap, new_topic):
    topic = new_topic(partitions=1, prefix="ec130")
    proc = subprocess.Popen([sys.executable, "-m", "workers", "produce", "--bootstrap-servers", bootstrap,
                             "--topic", topic, "--count", "1000000", "--rate", "200"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: partition_ends(bootstrap, topic, 1)[0] > 0 or proc.poll() is not None, timeout=60,
                   what="the first records")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == ExitCode.INTERRUPTED, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_143_forced_stop_by_a_second_signal(bootstrap, new_topic, tmp_path):
    topic = new_topic(partitions=1, prefix="ec143")
    w = _slow_worker(bootstrap, topic, tmp_path, "forced")
    w.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: w.log().count('"signal received"') >= 1, timeout=30, what="the first signal")
    assert w.terminate() == ExitCode.FORCED_STOP, w.log()[-3000:]


@pytest.mark.parametrize("code", list(ExitCode))
def test_every_code_has_a_test_here(code):
    names = [n for n in globals() if n.startswith(f"test_{int(code)}_")]
    assert names, f"no test makes a sluice process exit {int(code)} ({code.name})"
