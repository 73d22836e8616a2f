"""``sluice demo``: the main job, end to end, on an embedded devbroker.

Starts a devbroker in a temporary directory, creates the topics, produces
synthetic flow telemetry at a steady rate with a small share of malformed
records, runs the worker, prints a status line per second and a few sample
scores, stops by itself, then reads the output topics back with
``read_committed`` and checks that every produced record has exactly one
score or dead letter.

Ctrl-C (SIGINT, to the demo alone or to the terminal's whole process group) or
SIGTERM stops the traffic and the worker within a few seconds; the demo then
says ``interrupted``, checks exactly-once over what was processed so far (every
input offset below the committed offsets has exactly one output, and no more
was committed than the producer had acknowledged) and exits 130. The devbroker
does not see the terminal's SIGINT (see :func:`_start_broker`), so it outlives
the worker: it is stopped last, after the worker has committed and closed.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from workers import logs
from workers.config import load_settings
from workers.exit_codes import ExitCode
from workers.kafka.admin import ensure_topics
from workers.kafka.telemetry_producer import produce_telemetry
from workers.logs import kafka_logger
from workers.metrics import Metrics, MetricsServer
from workers.pipeline import Pipeline

INPUT_TOPIC = "flows"
GROUP_ID = "sluice-demo"
BAD_FRACTION = 0.01
# After traffic stops, how long the worker may take to catch up before the demo stops it anyway.
CATCH_UP_TIMEOUT_S = 20.0
MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "flow_classifier"
# The second half of the demo's traffic drifts by this magnitude (sluice produce --drift).
DRIFT_PHASE_MAGNITUDE = 1.0
# The status line's PSI covers this many seconds, so the drifting phase shows within seconds.
STATUS_PSI_WINDOW_S = 5.0
DRIFT_ALERT_PSI = 0.2
# Reading the outputs back: at most this long for everything the group committed to show up
# (read_committed, on a local broker it takes well under a second).
READ_BACK_TIMEOUT_S = 30.0
# The read-back also ends after this long without a new record (a mismatch: what it waits for
# never comes); read_committed records of a local broker arrive in milliseconds.
READ_BACK_IDLE_S = 2.0
# Metadata, committed offsets and watermarks from the local broker after the run.
OFFSETS_TIMEOUT_S = 10.0
# Waiting for the traffic thread to flush and return once stopped (its flush is bounded too).
TRAFFIC_JOIN_TIMEOUT_S = 10.0


def _status_line(p: Pipeline, prev: dict, elapsed: float) -> str:
    """One line per second: per-second rates, then running totals, then gauges, each group labelled."""
    st = p.stats
    dt = max(1e-6, elapsed - prev.get("t", 0.0))
    consumed_s = (st.consumed - prev.get("consumed", 0)) / dt
    scored_s = (st.scored - prev.get("scored", 0)) / dt
    batch = st.batch_events / st.batches if st.batches else 0.0
    p99 = st.latency_quantile(0.99) * 1000
    prev.update(t=elapsed, consumed=st.consumed, scored=st.scored)
    psi = "  n/a" if st.max_psi != st.max_psi else f"{st.max_psi:5.2f}"
    alert = " DRIFT" if st.max_psi >= DRIFT_ALERT_PSI else ""
    return (
        f"[{elapsed:5.1f}s] per second: consumed={consumed_s:7.0f} scored={scored_s:7.0f} | "
        f"total: consumed={st.consumed:8d} scored={st.scored:8d} dlq={st.dead_letters:5d} commits={st.commits:4d} | "
        f"batch={batch:6.1f} p99={p99:6.1f}ms lag={st.lag:5d} max_psi={psi}{alert}"
    )


def _reader(bootstrap: str, group: str) -> Consumer:
    return Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "isolation.level": "read_committed", "enable.auto.commit": False, "logger": kafka_logger(),
    })


def _read_back(bootstrap: str, topics: list[str], done) -> list:
    """Committed records of ``topics`` from the start, until ``done(records)`` or nothing new for a while.

    Partitions are assigned, not subscribed: no group join to wait for, so a quiet second
    really means there is nothing more to read.
    """
    c = _reader(bootstrap, "demo-reader")
    out: list = []
    try:
        md = c.list_topics(timeout=OFFSETS_TIMEOUT_S)
        c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics if t in md.topics
                  for p in md.topics[t].partitions])
        deadline = time.monotonic() + READ_BACK_TIMEOUT_S
        idle_since = time.monotonic()
        while time.monotonic() < deadline and not done(out):
            good = [m for m in c.consume(10_000, 0.2) if m.error() is None]
            out.extend(good)
            if good:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > READ_BACK_IDLE_S:
                break
    finally:
        c.close()
    return out


def _input_offsets(bootstrap: str, partitions: int) -> tuple[dict[int, int], dict[int, int]]:
    """Per input partition: the demo group's committed offset (0 if none) and the end offset."""
    c = _reader(bootstrap, GROUP_ID)
    try:
        tps = [TopicPartition(INPUT_TOPIC, p) for p in range(partitions)]
        committed = {tp.partition: max(0, tp.offset) for tp in c.committed(tps, timeout=OFFSETS_TIMEOUT_S)}
        ends = {p: c.get_watermark_offsets(TopicPartition(INPUT_TOPIC, p), timeout=OFFSETS_TIMEOUT_S)[1]
                for p in range(partitions)}
    finally:
        c.close()
    return committed, ends


def _output_sources(scores: list, dlq: list) -> Counter:
    """(partition, offset) of the input record behind every committed output, with multiplicity."""
    seen: Counter = Counter()
    for m in scores:
        src = orjson.loads(m.value())["source"]
        seen[(src["partition"], src["offset"])] += 1
    for m in dlq:
        h = dict(m.headers() or [])
        seen[(int(h["sluice.source.partition"]), int(h["sluice.source.offset"]))] += 1
    return seen


def _exactly_once_problems(seen: Counter, committed: dict[int, int]) -> list[str]:
    """What breaks exactly-once: every input offset below the committed offsets has one output, none other."""
    problems = []
    dup = sum(1 for v in seen.values() if v > 1)
    if dup:
        problems.append(f"{dup} input records have more than one output")
    expected = {(p, o) for p, end in committed.items() for o in range(end)}
    missing = len(expected - set(seen))
    extra = len(set(seen) - expected)
    if missing:
        problems.append(f"{missing} committed input records have no output")
    if extra:
        problems.append(f"{extra} outputs for input records beyond the committed offsets")
    return problems


def _start_broker(broker) -> None:
    """Start the devbroker so that the terminal's Ctrl-C does not reach it.

    Ctrl-C sends SIGINT to the terminal's whole foreground process group, the devbroker
    subprocess included; it used to die first, and the worker then drained against a dead
    broker for a minute and a half. The child inherits the signal mask of the thread that
    starts it, so it is started with SIGINT blocked: it keeps running until the demo stops
    it (SIGTERM) after the worker. A SIGINT meant for the demo meanwhile stays pending here
    and is delivered when the mask is restored.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        broker.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run_demo(duration: float = 30.0, rate: float = 5000.0, partitions: int = 4,
             early_signals: list[int] | None = None) -> int:
    """Run the demo; the exit code: 0 (exactly once), 1 (a mismatch or failure), 130 (interrupted)."""
    logs.setup("WARNING", "text")
    demo = _Demo(min(duration, 60.0), rate, partitions)
    signal.signal(signal.SIGINT, demo.on_signal)
    signal.signal(signal.SIGTERM, demo.on_signal)
    # Signals that arrived before the handlers above (while modules imported) count too.
    demo.interrupted.extend(early_signals or [])
    return demo.run()


class _Demo:
    """One demo run: its broker, traffic, worker and the signals that stop them."""

    def __init__(self, duration: float, rate: float, partitions: int) -> None:
        self.duration = duration
        self.rate = rate
        self.partitions = partitions
        self.interrupted: list[int] = []
        self.stop_traffic = threading.Event()
        self.pipeline: Pipeline | None = None
        self.produced: dict = {}

    def on_signal(self, signum: int, _frame) -> None:
        """SIGINT/SIGTERM: stop the traffic and the worker (a second signal aborts instead of draining)."""
        # No printing here: a handler runs between two bytecodes of the main thread, possibly
        # inside a print of its own (a reentrant write raises). The summary says it afterwards.
        self.interrupted.append(signum)
        self.stop_traffic.set()
        if self.pipeline is not None:
            self.pipeline.request_stop()

    def run(self) -> int:
        from devbroker import DevBroker

        with tempfile.TemporaryDirectory(prefix="sluice-demo-") as tmp:
            broker = DevBroker(data_dir=Path(tmp) / "broker", partitions=self.partitions)
            _start_broker(broker)
            try:
                return self._run(broker.bootstrap)
            finally:
                # Last: the worker and every client are closed by now (never the other way round).
                broker.close()

    def _run(self, bootstrap: str) -> int:
        print(f"demo: devbroker at {bootstrap} (development only), model {MODEL_PATH.name}")
        admin = AdminClient({"bootstrap.servers": bootstrap, "logger": kafka_logger()})
        ensure_topics(admin, [INPUT_TOPIC], self.partitions)
        del admin  # librdkafka clients must be gone before the broker stops
        settings = load_settings(
            None,
            environ={},
            kafka={"bootstrap_servers": bootstrap, "group_id": GROUP_ID, "input_topics": [INPUT_TOPIC],
                   "replica_id": "demo-0", "session_timeout_ms": 6000},
            model={"path": str(MODEL_PATH)},
            metrics={"port": 0, "host": "127.0.0.1"},
            transactions={"commit_interval_ms": 100},
            drift={"recent_s": STATUS_PSI_WINDOW_S},
        )
        metrics = Metrics()
        server = MetricsServer(metrics, "127.0.0.1", 0).start()
        try:
            pipeline = Pipeline(settings, metrics)
            pipeline.start()
            self.pipeline = pipeline
            if self.interrupted:  # during start-up (the handler saw no pipeline yet)
                pipeline.request_stop()
            else:
                print(f"demo: worker ready; metrics at http://127.0.0.1:{server.port}/metrics; offering "
                      f"{self.rate:.0f} events/s for {self.duration:.0f}s with {BAD_FRACTION:.0%} malformed records")
                print(f"demo: first half training-like traffic, second half drifted (--drift {DRIFT_PHASE_MAGNITUDE}); "
                      f"max_psi is over the last {STATUS_PSI_WINDOW_S:.0f}s, DRIFT at >= {DRIFT_ALERT_PSI}; "
                      "Ctrl-C stops early", flush=True)
            code = self._drive(pipeline, bootstrap)
        finally:
            server.stop()
        return self._check(pipeline, settings, bootstrap, code)

    def _traffic(self, bootstrap: str) -> None:
        count = int(self.rate * self.duration)
        seed = int(time.time())
        try:
            n = produce_telemetry(
                bootstrap, INPUT_TOPIC, count=count // 2, rate=self.rate, seed=seed,
                bad_fraction=BAD_FRACTION, stop=self.stop_traffic,
            )
            if not self.stop_traffic.is_set():
                print(f"demo: traffic now drifts (--drift {DRIFT_PHASE_MAGNITUDE})", flush=True)
                n += produce_telemetry(
                    bootstrap, INPUT_TOPIC, count=count - count // 2, rate=self.rate, seed=seed + 1,
                    bad_fraction=BAD_FRACTION, stop=self.stop_traffic, drift=DRIFT_PHASE_MAGNITUDE,
                )
            self.produced["n"] = n
        except Exception as exc:  # noqa: BLE001 - reported below, the demo then fails
            self.produced["error"] = str(exc)

    def _drive(self, pipeline: Pipeline, bootstrap: str) -> int:
        """Traffic and status threads around pipeline.run(); the worker's exit code."""
        producer_thread = threading.Thread(target=self._traffic, args=(bootstrap,), name="demo-traffic", daemon=True)

        def status():
            prev: dict = {}
            t0 = time.monotonic()
            caught_up_since = None
            while not pipeline._stop_requested:
                time.sleep(1.0)
                if pipeline._stop_requested:
                    break
                print(_status_line(pipeline, prev, time.monotonic() - t0), flush=True)
                if not producer_thread.is_alive():
                    target = self.produced.get("n", -1)
                    done = pipeline.stats.consumed >= target and not pipeline._inflight
                    if done or "error" in self.produced:
                        caught_up_since = caught_up_since or time.monotonic()
                        if time.monotonic() - caught_up_since >= 1.0:
                            pipeline.request_stop()
                    elif time.monotonic() - t0 > self.duration + CATCH_UP_TIMEOUT_S:
                        pipeline.request_stop()

        if not self.interrupted:
            producer_thread.start()
            threading.Thread(target=status, name="demo-status", daemon=True).start()
        code = pipeline.run()
        self.stop_traffic.set()
        if producer_thread.is_alive():
            producer_thread.join(TRAFFIC_JOIN_TIMEOUT_S)
        return code

    def _check(self, pipeline: Pipeline, settings, bootstrap: str, code: int) -> int:
        """Read the outputs back and check exactly-once over what the group committed."""
        if self.interrupted:
            names = ", ".join(dict.fromkeys(signal.Signals(s).name for s in self.interrupted))
            print(f"demo: interrupted ({names}); worker stopped (exit {code}); checking what was processed so far",
                  flush=True)
        if "error" in self.produced:
            print(f"demo: traffic failed: {self.produced['error']}", file=sys.stderr)
            return ExitCode.FAILURE
        acked = self.produced.get("n", 0)  # acknowledged by the broker (the producer flushed)
        committed, ends = _input_offsets(bootstrap, self.partitions)
        processed = sum(committed.values())
        records = _read_back(bootstrap, [settings.topics.scores, settings.topics.dlq],
                             lambda out: len(out) >= processed)
        scores = [m for m in records if m.topic() == settings.topics.scores]
        dlq = [m for m in records if m.topic() == settings.topics.dlq]
        deltas = _read_back(bootstrap, [settings.topics.drift],
                            lambda out: sum(orjson.loads(m.value())["count"] for m in out) >= len(scores))
        counted = sum(orjson.loads(m.value())["count"] for m in deltas)
        if scores:
            print("demo: sample scores (committed, read back with read_committed):")
            ranked = sorted((orjson.loads(m.value()) for m in scores[:5000]), key=lambda r: -r["score"])
            for rec in ranked[:3] + ranked[-2:]:
                print(f"  {rec['event_id']}  score={rec['score']:.4f} label={rec['label']}  "
                      f"from {rec['source']['topic']}[{rec['source']['partition']}]@{rec['source']['offset']}")
        reasons: Counter = Counter()
        for m in dlq:
            for k, v in m.headers() or []:
                if k == "sluice.error.reason":
                    reasons[v.decode()] += 1
        if reasons:
            print("demo: dead letters by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
        problems = _exactly_once_problems(_output_sources(scores, dlq), committed)
        if sum(ends.values()) != acked:
            problems.append(f"the input topic holds {sum(ends.values())} records, the producer had {acked} acknowledged")
        if counted != len(scores):
            problems.append(f"drift deltas counted {counted} events, {len(scores)} were scored")
        if not self.interrupted:
            # Run to the end: everything produced must have been processed, and the worker drained.
            if processed != acked:
                problems.append(f"{acked - processed} produced records were not processed")
            if code != ExitCode.OK:
                problems.append(f"the worker exited {code}")
        st = pipeline.stats
        print(
            f"demo: scored={len(scores)} dlq={len(dlq)} produced={acked} processed={processed} "
            f"drift_counted={counted} commits={st.commits} aborts={st.aborts} "
            f"p99_ms={st.latency_quantile(0.99) * 1000:.1f} exactly_once={'ok' if not problems else 'MISMATCH'}"
            + (" (interrupted: checked over the processed records)" if self.interrupted else "")
        )
        for problem in problems:
            print(f"demo: MISMATCH: {problem}", file=sys.stderr)
        if problems:
            return ExitCode.FAILURE
        return ExitCode.INTERRUPTED if self.interrupted else ExitCode.OK
