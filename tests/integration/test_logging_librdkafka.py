"""librdkafka's logs go through the structured logger: `sluice run` against an unreachable
broker writes JSON lines only (no raw `%3|...|FAIL|` lines), a handful instead of hundreds,
with the client's name, and its cannot-start message names the bootstrap servers."""

from __future__ import annotations

import socket
import subprocess
import sys

import orjson

from workers.exit_codes import ExitCode

from .worker_harness import ROOT, worker_env

# Lines librdkafka wrote in the 15 s of metadata timeout before: ~290. Rate-limited now.
MAX_KAFKA_LINES = 10


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_broker_logs_json_rate_limited_and_names_the_servers():
    bootstrap = f"127.0.0.1:{_closed_port()}"
    env = worker_env(bootstrap, "flows", replica="unreach", group="g-unreach")
    run = subprocess.run([sys.executable, "-m", "workers", "run"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == ExitCode.TEMPFAIL, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    assert not [ln for ln in lines if ln.startswith("%")], "raw librdkafka lines on stderr"
    # JSON lines, and the one plain summary line for humans at the end.
    records = [orjson.loads(ln) for ln in lines if not ln.startswith("sluice: cannot start:")]
    kafka = [r for r in records if r["logger"] == "sluice.kafka"]
    assert kafka, "librdkafka's reason (connection refused) must be logged"
    assert len(kafka) <= MAX_KAFKA_LINES, f"{len(kafka)} librdkafka lines: not rate-limited"
    assert all(r["client"].startswith("sluice-unreach#") and r["facility"] for r in kafka)
    assert any("Connection refused" in r["msg"] for r in kafka)
    (failed,) = [r for r in records if r["msg"] == "cannot start"]
    assert failed["bootstrap_servers"] == bootstrap and bootstrap in failed["error"]
    assert failed["exit_code"] == ExitCode.TEMPFAIL
