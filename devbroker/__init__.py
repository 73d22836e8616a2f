"""devbroker: a single-node Kafka-wire-compatible broker for development and
tests — never for production. `DevBroker` runs it in a subprocess:

    with DevBroker() as b:          # temp data dir, free port
        conf = {"bootstrap.servers": b.bootstrap}
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["DevBroker"]


class DevBroker:
    """Start `python -m devbroker` in a subprocess and read its bootstrap line."""

    def __init__(self, data_dir: str | None = None, partitions: int = 1, port: int = 0,
                 extra_args: list[str] | None = None, startup_timeout: float = 30.0):
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="devbroker-")
            data_dir = self._tmp
        self.data_dir = str(data_dir)
        self.partitions = partitions
        self.port = port
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.bootstrap = ""

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "DevBroker":
        if self.proc is not None and self.proc.poll() is None:
            return self
        deadline = time.monotonic() + self.startup_timeout
        keep_port_until = time.monotonic() + min(10.0, self.startup_timeout / 2)
        while True:
            try:
                self._spawn(deadline)
                return self
            except OSError:
                # the old port may still be held briefly after a kill: retry it for a while,
                # then take any free port (clients must then be given the new .bootstrap)
                if time.monotonic() > deadline:
                    raise
                if self.port and time.monotonic() > keep_port_until:
                    self.port = 0
                time.sleep(0.2)

    def _spawn(self, deadline: float) -> None:
        cmd = [sys.executable, "-m", "devbroker", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", self.data_dir, "--partitions", str(self.partitions), *self.extra_args]
        env = dict(os.environ)
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, env=env, text=True)
        line_box: list[str] = []

        def read_first() -> None:
            assert proc.stdout is not None
            line_box.append(proc.stdout.readline())

        t = threading.Thread(target=read_first, daemon=True)
        t.start()
        t.join(max(0.1, deadline - time.monotonic()))
        line = line_box[0].strip() if line_box else ""
        if not line.startswith("bootstrap.servers="):
            proc.kill()
            proc.wait()
            raise OSError(f"devbroker did not start (exit {proc.returncode}, first line {line!r})")
        self.proc = proc
        self.bootstrap = line.split("=", 1)[1]
        self.port = int(self.bootstrap.rsplit(":", 1)[1])
        # keep draining stdout so the child never blocks on a full pipe
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()

    @staticmethod
    def _drain(proc: subprocess.Popen) -> None:
        try:
            assert proc.stdout is not None
            for _ in proc.stdout:
                pass
        except (OSError, ValueError):
            pass

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.proc = None
        return p.returncode

    def kill(self) -> None:
        """SIGKILL: simulates a crash."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.kill()
        p.wait()
        self.proc = None

    def restart(self, kill: bool = False) -> "DevBroker":
        """Stop (or kill) and start again on the same data dir, trying to keep the port."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "DevBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
