"""Ctrl-C in `sluice demo`: a real process, a real SIGINT (to its whole process group, as a
terminal sends it, or to the demo alone). It stops within seconds, says `interrupted`, checks
exactly-once over what was processed and exits 130; the devbroker outlives the worker."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from workers.exit_codes import ExitCode

from .worker_harness import ROOT

# From the signal to the demo's exit: stop the traffic, drain, commit, read back, stop the broker.
# "Within a few seconds" on an idle machine; this leaves room for a busy 2-core CI runner.
STOP_WITHIN_S = 30.0


class DemoProc:
    """`sluice demo` in its own session (so the group signal reaches it and its children only)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "workers", "demo", "--duration", "60"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._more():
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output()[-4000:]}")
                self._new.wait(min(left, 0.5))

    def _more(self) -> bool:
        return not self.proc.stdout.closed and self.proc.poll() is None

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _port_open(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("target", ["process group", "demo alone"])
def test_ctrl_c_stops_the_demo_checks_what_was_processed_and_exits_130(target):
    demo = DemoProc()
    try:
        bootstrap = demo.wait_for(r"devbroker at (\S+)", timeout=120).group(1)
        # Scores are flowing: a status line whose running total of scored events is above zero.
        demo.wait_for(r"total: consumed=\s*\d+ scored=\s*[1-9]\d*", timeout=120)
        sent_at = time.monotonic()
        if target == "process group":
            os.killpg(demo.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            demo.proc.send_signal(signal.SIGINT)
        code = demo.proc.wait(STOP_WITHIN_S)
        took = time.monotonic() - sent_at
        demo.wait_for(r"^demo: scored=", timeout=5)
        out = demo.output()
        assert code == ExitCode.INTERRUPTED, out[-4000:]
        assert "demo: interrupted (SIGINT)" in out
        # librdkafka's lines go through the logger (none raw), and no client saw its broker die.
        assert not [ln for ln in out.splitlines() if ln.startswith("%")], out[-4000:]
        summary = re.search(r"^demo: scored=(\d+) dlq=(\d+) produced=(\d+) processed=(\d+).* exactly_once=(\S+)",
                            out, re.M)
        assert summary, out[-4000:]
        scored, dlq, produced, processed, verdict = summary.groups()
        assert verdict == "ok", out[-4000:]
        assert int(scored) + int(dlq) == int(processed) > 0 and int(processed) <= int(produced)
        # The broker was not killed by the SIGINT: the worker drained against it (no 90 s wait)...
        assert "worker stopped (exit 0)" in out, out[-4000:]
        assert took < STOP_WITHIN_S
        # ...and it was stopped at the end, after the worker.
        assert not _port_open(bootstrap), "the demo's devbroker is still running"
    finally:
        demo.kill()
