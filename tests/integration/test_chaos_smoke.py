"""`scripts/chaos` in small: two supervised replicas on a broker of their own (the session's
kind), two replica SIGKILLs, a SIGTERM, a broker SIGKILL and a duplicate replica id, over 8k
events with hostile records; its JSON verdict must hold every check.

The script starts its own broker (devbroker, or Apache Kafka with SLUICE_TEST_BROKER=kafka),
so this test uses no fixture's broker; other kinds (external, testcontainers) cannot be
killed by it and skip.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import BROKER_KIND, ROOT

pytestmark = pytest.mark.slow

EVENTS = 8000
# 8000 events at 130/s: a feed of about a minute, room for the actions between the first
# commit and the feed's last ten seconds.
RATE = 130
# The run itself takes about 90 s on devbroker; Kafka's starts (twice) add a minute or so.
RUN_TIMEOUT_S = 480


def test_chaos_smoke_verdict_holds(tmp_path):
    if BROKER_KIND not in ("devbroker", "kafka"):
        pytest.skip(f"scripts/chaos starts and kills its own devbroker or kafka (SLUICE_TEST_BROKER={BROKER_KIND})")
    out = tmp_path / "chaos"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos"), "--broker", BROKER_KIND, "--events", str(EVENTS),
         "--rate", str(RATE), "--replicas", "2", "--replica-kills", "2", "--sigterms", "1", "--broker-kills", "1",
         "--duplicate", "--seed", "7", "--json", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.stdout.strip(), f"no verdict (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    v = json.loads(proc.stdout)
    context = f"{json.dumps(v, indent=1)[:6000]}\n--- progress ---\n{proc.stderr[-3000:]}"
    assert "error" not in v, context
    # every action happened: the verdict is about a run that met each fault
    assert v["actions"] == {"replica-kill": 2, "sigterm": 1, "broker-kill": 1, "duplicate": 1}, context
    assert v["input_offsets"] == EVENTS and v["lost"] == 0 and v["duplicated"] == 0 and v["extra"] == 0, context
    assert v["scores"] + v["dead_letters"] == EVENTS, context
    assert v["dead_letters"] > 0 and v["dead_letter_reasons"], context  # the hostile share reached the DLQ
    assert v["drift_count"] == v["scores"], context
    assert v["exit_codes"].get("-9 (SIGKILL)", 0) >= 2, context
    assert v["duplicate"]["exit"] == 3, context
    assert len(v["broker_restarts"]) == 1 and v["broker_restarts"][0]["resume_s"] is not None, context
    assert v["ok"] and all(v["checks"].values()), context
    assert proc.returncode == 0, context
