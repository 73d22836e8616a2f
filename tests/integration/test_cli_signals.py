"""SIGTERM while `sluice` is still importing its modules stops it cleanly (exit 0), not with the
default action (exit status -15): the handlers are installed before the heavy imports."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.exit_codes import ExitCode

from .worker_harness import ROOT, _STARTED, worker_env

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)
# The handler must be in place long before the imports end (they take 1-2 s on the 2-core CI
# machine); polling /proc every millisecond sees it well inside that.
HANDLER_TIMEOUT_S = 30.0


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (the SigCgt mask in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & SIGTERM_BIT)


ENTRIES = {
    "console-script": [str(Path(sys.executable).with_name("sluice")), "run"],
    "python -m workers": [sys.executable, "-m", "workers", "run"],
}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_sigterm_right_after_spawn_exits_0(entry, bootstrap, new_topic):
    argv = ENTRIES[entry]
    if not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]} is not installed")
    topic = new_topic(partitions=1, prefix="early-term")
    proc = subprocess.Popen(argv, env=worker_env(bootstrap, topic, replica="early", group=f"g-{topic}"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _STARTED.append(proc)
    deadline = time.monotonic() + HANDLER_TIMEOUT_S
    while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert proc.poll() is None, proc.stdout.read()
    sent_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    out = proc.stdout.read()
    assert code == ExitCode.OK, f"exit {code} (-15 = killed by the default action)\n{out[-3000:]}"
    assert time.monotonic() - sent_at < 30, "a stop before the start must not wait for the start"
    assert '"stopped before starting"' in out or '"drained and committed' in out, out[-3000:]
