"""Apache Kafka started by `scripts/kafka`, for the tests and the bench (never the worker).

`ApacheKafka(data_dir, brokers=N).start()` runs `scripts/kafka start` (which fetches Kafka
from Maven Central once per machine, formats KRaft storage and waits until the cluster can
create a topic) and keeps what it printed: `.bootstrap`, and for a SASL_SSL cluster the CA,
the super user and the plaintext admin listener in `.info`. kill/stop/start act on every node
or on one (`node=1..N`); a start on the same data dir keeps topics, records, offsets and ports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kafka"
# A first start on a fresh machine also fetches Kafka (about 55 MB) through Maven.
START_TIMEOUT_S = 600.0


class ApacheKafka:
    """An Apache Kafka cluster in its own data dir (N nodes, each broker and controller)."""

    kind = "kafka"

    def __init__(self, data_dir: str | Path, brokers: int = 1, sasl_ssl: str | Path | None = None):
        self.data_dir = str(data_dir)
        self.brokers = brokers
        self.sasl_ssl = str(sasl_ssl) if sasl_ssl else None
        self.info: dict[str, str] = {}
        self.bootstrap = ""

    def _script(self, *args: str, timeout: float = START_TIMEOUT_S) -> str:
        if not SCRIPT.exists():
            raise RuntimeError(f"{SCRIPT} is missing: Apache Kafka is started from a source checkout")
        # This interpreter, so that the start-up probe uses confluent-kafka (no extra JVM start).
        proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--data-dir", self.data_dir],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/kafka {args[0]} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def start(self) -> "ApacheKafka":
        """Start every node that is not running and wait until the cluster works."""
        args = ["start", "--brokers", str(self.brokers)]
        if self.sasl_ssl:
            args += ["--sasl-ssl", self.sasl_ssl]
        out = self._script(*args)
        self.info = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        self.bootstrap = self.info["bootstrap.servers"]
        return self

    def stop(self, node: int | None = None) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after scripts/kafka's STOP_TIMEOUT_S."""
        self._script("stop", *(["--node", str(node)] if node else []))

    def kill(self, node: int | None = None) -> None:
        """SIGKILL at once: a crash."""
        self._script("stop", "--kill", *(["--node", str(node)] if node else []))

    def restart(self, kill: bool = False) -> "ApacheKafka":
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def pid(self, node: int = 1) -> int | None:
        try:
            return int(Path(self.data_dir, f"node-{node}", "pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        """Stop every node; never raises (teardown must not mask a test's own outcome)."""
        try:
            self.stop()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "ApacheKafka":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
