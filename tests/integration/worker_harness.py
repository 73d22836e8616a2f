"""Helpers for the worker's integration tests: run `sluice run` as a real process,
produce telemetry, and read the outputs back the way a SIEM would (read_committed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
# Every worker process a test started; the integration conftest kills what is left after each
# test, pass or fail, so a failed test cannot leave workers polling a broker that is gone.
_STARTED: list[subprocess.Popen] = []


def kill_leftovers() -> None:
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
MODEL = ROOT / "models" / "flow_classifier"


def worker_env(bootstrap: str, input_topic: str, replica: str, group: str, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SLUICE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "SLUICE_KAFKA__GROUP_ID": group,
            "SLUICE_KAFKA__INPUT_TOPICS": f'["{input_topic}"]',
            "SLUICE_KAFKA__REPLICA_ID": replica,
            "SLUICE_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "SLUICE_KAFKA__TRANSACTION_TIMEOUT_MS": "10000",
            "SLUICE_TOPICS__SCORES": f"{input_topic}-scores",
            "SLUICE_TOPICS__DLQ": f"{input_topic}-dlq",
            "SLUICE_TOPICS__DRIFT": f"{input_topic}-drift",
            # The lifecycle topics too: a test's deployments and audits never meet another's.
            "SLUICE_TOPICS__CONTROL": f"{input_topic}-control",
            "SLUICE_TOPICS__SHADOW": f"{input_topic}-shadow",
            "SLUICE_TOPICS__AUDIT": f"{input_topic}-audit",
            "SLUICE_MODEL__PATH": str(MODEL),
            "SLUICE_METRICS__PORT": "0",
            "SLUICE_METRICS__HOST": "127.0.0.1",
            "SLUICE_LOGGING__FORMAT": "json",
            "SLUICE_TRANSACTIONS__COMMIT_INTERVAL_MS": "100",
            "SLUICE_BATCHING__MAX_BATCH_SIZE": "256",
        }
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@dataclass
class WorkerProc:
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    exits: list[int] = field(default_factory=list)
    _log_from: int = 0  # where the latest incarnation's log begins

    def start(self) -> "WorkerProc":
        # one killed before it started logs no start line: look only at the latest's
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "run"], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        _STARTED.append(self.proc)
        return self

    def wait_started(self, timeout: float = 60.0) -> None:
        """Wait until the latest incarnation has logged its start (signal handlers are set)."""
        wait_until(lambda: b'"worker started"' in self.log_path.read_bytes()[self._log_from:] or not self.alive(),
                   timeout, what="the worker to start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.exits.append(self.proc.wait(30))

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.exits.append(code)
        return code

    def dump_stacks(self) -> None:
        """Ask a live worker for every thread's Python stack (SIGUSR2, see `sluice run`); it
        lands in the worker's log, for the failing test's message."""
        if self.alive():
            size = self.log_path.stat().st_size
            self.proc.send_signal(signal.SIGUSR2)
            try:
                wait_until(lambda: self.log_path.stat().st_size > size, 5, what="the stack dump")
            except AssertionError:
                pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_port(self, timeout: float = 60.0) -> int:
        """The latest incarnation's metrics port (SLUICE_METRICS__PORT=0: from its start log line)."""
        def port() -> int | None:
            for line in self.log_path.read_bytes()[self._log_from:].splitlines():
                if b'"metrics server listening"' in line:
                    return int(orjson.loads(line)["port"])
            return None

        wait_until(lambda: port() is not None or not self.alive(), timeout, what="the metrics server")
        found = port()
        assert found is not None, "the worker exited before its metrics server listened:\n" + self.log()[-3000:]
        return found

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` (e.g. ``sluice_transactions_aborted_total``) whose
        labels include ``labels``, read from the live worker's /metrics; 0 if none."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port()}/metrics", timeout=5).read().decode()
        return sum(s.value for fam in text_string_to_metric_families(body) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_working(w: WorkerProc, transactions: float = 1, timeout: float = 60) -> None:
    """Wait until the worker's current incarnation holds partitions and has committed
    `transactions` transactions (its /metrics): it has joined the group and is working."""
    wait_until(lambda: not w.alive() or (w.metric("sluice_assigned_partitions") > 0
                                         and w.metric("sluice_transactions_committed_total") >= transactions),
               timeout, what=f"{w.log_path.stem} to hold partitions and commit {transactions:.0f} transactions")
    assert w.alive(), w.log()[-3000:]


class Feeder:
    """Telemetry fed to `topic` at `rate` events/s on a thread until stop() (or `limit` events),
    so that a test's membership changes and kills happen mid-stream however long they take.
    stop() returns how many events were acknowledged: the input's size."""

    def __init__(self, bootstrap: str, topic: str, rate: float, seed: int, limit: int = 500_000, **kwargs):
        from workers.kafka.telemetry_producer import produce_telemetry

        self._stop = threading.Event()
        self._result: list = []

        def feed() -> None:
            try:
                self._result.append(produce_telemetry(bootstrap, topic, count=limit, rate=rate, seed=seed,
                                                      stop=self._stop, **kwargs))
            except Exception as exc:  # noqa: BLE001 - handed to stop()'s caller
                self._result.append(exc)

        self._thread = threading.Thread(target=feed, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 150.0) -> int:
        self._stop.set()
        self._thread.join(timeout)
        assert self._result, "the feeder did not finish"
        if isinstance(self._result[0], Exception):
            raise self._result[0]
        return self._result[0]


def read_all(bootstrap: str, topic: str, min_count: int = 0, timeout: float = 60.0, idle: float = 2.0) -> list:
    """Every committed record of `topic` (read_committed), waiting for at least min_count.

    The partitions are assigned, not subscribed (no group join to wait for), and read until each
    reaches the end it had when the read began (its high watermark) with at least min_count
    records; only when that end is not reached (an open transaction holds the last stable offset
    back) does the read end after `idle` seconds without a new record.
    """
    from confluent_kafka import OFFSET_BEGINNING

    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"reader-{topic}-{time.monotonic_ns()}",
        "auto.offset.reset": "earliest", "isolation.level": "read_committed", "enable.auto.commit": False,
    })
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            md = c.list_topics(topic, timeout=10).topics.get(topic)
            if md is not None and md.error is None and md.partitions:
                break
            if time.monotonic() > deadline:
                return out
            time.sleep(0.2)
        parts = sorted(md.partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            msgs = [m for m in c.consume(10_000, 0.2) if m.error() is None]
            if msgs:
                out.extend(msgs)
                last_new = time.monotonic()
            if len(out) >= min_count:
                pos = {tp.partition: tp.offset for tp in c.position([TopicPartition(topic, p) for p in parts])}
                if all(pos.get(p, -1) >= end for p, end in ends.items() if end > 0):
                    break
                if not msgs and time.monotonic() - last_new > idle:
                    break
    finally:
        c.close()
    return out


def all_committed(bootstrap: str, group: str, topic: str, partitions: int, total: int) -> bool:
    """Whether `group` has committed offsets summing to `total` on `topic` (a predicate for
    wait_until: a coordinator still loading, e.g. NOT_COORDINATOR on a fresh Kafka, is "not yet")."""
    try:
        return sum(committed_offsets(bootstrap, group, topic, partitions).values()) == total
    except KafkaException:
        return False


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets; retried while the group coordinator moves or loads (Kafka
    answers NOT_COORDINATOR / COORDINATOR_LOAD_IN_PROGRESS for a while after a start or a failover)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                  "isolation.level": "read_committed"})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
                return {tp.partition: tp.offset for tp in tps}
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        c.close()


@dataclass
class Outcome:
    scores: list
    dead_letters: list

    def source_offsets(self) -> Counter:
        """(topic, partition, offset) of every input record that got an output, with multiplicity."""
        seen: Counter = Counter()
        for m in self.scores:
            src = orjson.loads(m.value())["source"]
            seen[(src["topic"], src["partition"], src["offset"])] += 1
        for m in self.dead_letters:
            h = dict(m.headers())
            seen[(h["sluice.source.topic"].decode(), int(h["sluice.source.partition"]),
                  int(h["sluice.source.offset"]))] += 1
        return seen

    def event_ids(self) -> Counter:
        return Counter(orjson.loads(m.value())["event_id"] for m in self.scores)

    def reasons(self) -> Counter:
        return Counter(dict(m.headers())["sluice.error.reason"].decode() for m in self.dead_letters)


def outcome(bootstrap: str, input_topic: str, expected: int, timeout: float = 90.0) -> Outcome:
    """The committed scores and dead letters of `input_topic`, once they number at least `expected`
    (or at `timeout`: the caller's assertions then say what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        left = max(1.0, deadline - time.monotonic())
        scores = read_all(bootstrap, f"{input_topic}-scores", timeout=left)
        dlq = read_all(bootstrap, f"{input_topic}-dlq", timeout=left)
        if len(scores) + len(dlq) >= expected or time.monotonic() >= deadline:
            return Outcome(scores, dlq)
        time.sleep(0.5)


def assert_exactly_once(out: Outcome, input_topic: str, partition_ends: dict[int, int]) -> None:
    """Every input offset has exactly one output; no output for an offset that does not exist."""
    seen = out.source_offsets()
    dup = {k: v for k, v in seen.items() if v != 1}
    assert not dup, f"{len(dup)} input offsets have more than one output, e.g. {list(dup.items())[:5]}"
    expected = {(input_topic, p, o) for p, end in partition_ends.items() for o in range(end)}
    missing = expected - set(seen)
    extra = set(seen) - expected
    assert not missing, f"{len(missing)} input records have no output, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} outputs for offsets never produced, e.g. {sorted(extra)[:5]}"
    ids = out.event_ids()
    dup_ids = [k for k, v in ids.items() if v > 1]
    assert not dup_ids, f"event ids scored more than once: {dup_ids[:5]}"


def partition_ends(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ends", "isolation.level": "read_committed"})
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    c.close()
    return ends


def wait_until(pred, timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
