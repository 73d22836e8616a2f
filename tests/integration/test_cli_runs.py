"""`sluice bench` and `sluice demo` end to end, small: each runs its own devbroker and worker."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _sluice(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_bench_accounts_for_every_event_and_measures_latency(tmp_path):
    out = tmp_path / "bench.json"
    run = _sluice("bench", "--events", "3000", "--latency-seconds", "2", "--repeat", "1", "--json", str(out),
                  timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    # Every preloaded event became exactly one score or dead letter in each measured run.
    for phase in ("passthrough", "worker", "worker_no_drift"):
        assert result[phase]["events"] == 3000, phase
    assert result["worker"]["dead_letters"] > 0, "the preload has malformed records"
    assert 0 < result["ratio"] < 5
    lat = result["latency"]
    assert lat["read"] > 0 and lat["samples"] > 0, "the reader saw no score records"
    assert 0 < lat["visible_p50_ms"] <= lat["visible_p99_ms"] < 60_000
    assert math.isfinite(lat["emit_p99_ms"]) and lat["emit_p99_ms"] > 0
    assert result["worker"]["peak_rss_mb"] > 50


def test_demo_scores_and_dead_letters_then_stops_by_itself():
    run = _sluice("demo", "--duration", "8", timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    last = re.search(r"^demo: scored=(\d+) dlq=(\d+)", run.stdout, re.M)
    assert last, run.stdout[-2000:]
    assert int(last.group(1)) > 1000 and int(last.group(2)) > 0
    # Both kinds of events, each through its own route: exactly once per input topic, drift
    # counted per model, lineage on every score record, and sample scores of both kinds.
    routes = dict(re.findall(r"^demo: route (\w+): .* scored=(\d+) .* lineage=ok exactly_once=ok$", run.stdout, re.M))
    assert set(routes) == {"flows", "auth"}, run.stdout[-3000:]
    assert all(int(n) > 0 for n in routes.values())
    assert re.search(r"^  flow .* role=primary deployment=flows@config-", run.stdout, re.M)
    assert re.search(r"^  auth .* role=primary deployment=auth@config-", run.stdout, re.M)
