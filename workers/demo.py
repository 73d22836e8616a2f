"""``sluice demo``: the main job, end to end, on an embedded devbroker.

Starts a devbroker in a temporary directory, creates two input topics and runs one worker with
two routes, as issue 12's SOC would: network flows -> ``models/flow_classifier`` -> the flow
scores topic, authentication events -> ``models/auth_anomaly`` -> the auth scores topic, each
route with its own dead-letter topic and drift deltas. It produces synthetic telemetry of both
kinds at a steady rate with a small share of malformed records (the second half drifted),
prints a status line per second and a few sample scores of each kind, stops by itself, then
reads the output topics back with ``read_committed`` and checks, per input topic, that every
produced record has exactly one score or dead letter in its own route's topics; that the
drift deltas counted every score of each model once; and that every score record carries its
lineage (deployment, role, model sha256).

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
from dataclasses import dataclass
from pathlib import Path

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from workers import logs
from workers.config import load_settings
from workers.control import initial_deployment
from workers.exit_codes import ExitCode
from workers.kafka.admin import ensure_topics
from workers.kafka.telemetry_producer import produce_telemetry
from workers.logs import kafka_logger
from workers.metrics import Metrics, MetricsServer
from workers.pipeline import Pipeline

MODELS = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class DemoRoute:
    """One kind of event in the demo: its input topic, model, output topics and share of the traffic."""

    name: str
    topic: str
    kind: str       # workers.telemetry kind of the events produced to ``topic``
    model: Path
    scores: str
    dlq: str
    share: float    # of the offered rate (--rate)


# Sign-ins are far rarer than flows on a real network; a fifth of the traffic still gives the
# auth model thousands of events in a short demo.
ROUTES = (
    DemoRoute("flows", "flows", "flow", MODELS / "flow_classifier", "flow-scores", "flow-dead-letters", 0.8),
    DemoRoute("auth", "auth-events", "auth", MODELS / "auth_anomaly", "auth-scores", "auth-dead-letters", 0.2),
)
GROUP_ID = "sluice-demo"
BAD_FRACTION = 0.01
# After traffic stops, how long the worker may take to catch up before the demo stops it anyway.
CATCH_UP_TIMEOUT_S = 20.0
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
# Waiting for the traffic threads to flush and return once stopped (their flush is bounded too).
TRAFFIC_JOIN_TIMEOUT_S = 10.0
# Sample scores printed per route: the highest few and the lowest few.
SAMPLE_TOP, SAMPLE_BOTTOM = 2, 1
# Score records ranked for the samples (the first of the read-back): enough to find high scores.
SAMPLE_POOL = 5000


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


def _input_offsets(bootstrap: str, topic: str, partitions: int) -> tuple[dict[int, int], dict[int, int]]:
    """Per partition of input ``topic``: the demo group's committed offset (0 if none) and the end offset."""
    c = _reader(bootstrap, GROUP_ID)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = {tp.partition: max(0, tp.offset) for tp in c.committed(tps, timeout=OFFSETS_TIMEOUT_S)}
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=OFFSETS_TIMEOUT_S)[1]
                for p in range(partitions)}
    finally:
        c.close()
    return committed, ends


def _output_sources(scores: list[dict], dlq: list) -> Counter:
    """(topic, partition, offset) of the input record behind every committed output, with multiplicity.

    ``scores`` are decoded score records, ``dlq`` dead-letter messages (their headers name the source).
    """
    seen: Counter = Counter()
    for rec in scores:
        src = rec["source"]
        seen[(src["topic"], src["partition"], src["offset"])] += 1
    for m in dlq:
        h = dict(m.headers() or [])
        seen[(h["sluice.source.topic"].decode(), int(h["sluice.source.partition"]),
              int(h["sluice.source.offset"]))] += 1
    return seen


def _exactly_once_problems(topic: str, seen: Counter, committed: dict[int, int]) -> list[str]:
    """What breaks exactly-once for input ``topic``, from the outputs in its route's topics.

    Every input offset below the committed offsets has one output there, and there is no other:
    none for a record of another topic (it went to the wrong route), none beyond the committed offsets.
    """
    problems = []
    foreign = sum(v for (t, _, _), v in seen.items() if t != topic)
    if foreign:
        problems.append(f"{topic}: {foreign} outputs in its route's topics come from other input topics")
    mine = Counter({(p, o): v for (t, p, o), v in seen.items() if t == topic})
    dup = sum(1 for v in mine.values() if v > 1)
    if dup:
        problems.append(f"{topic}: {dup} input records have more than one output")
    expected = {(p, o) for p, end in committed.items() for o in range(end)}
    missing = len(expected - set(mine))
    extra = len(set(mine) - expected)
    if missing:
        problems.append(f"{topic}: {missing} committed input records have no output")
    if extra:
        problems.append(f"{topic}: {extra} outputs for input records beyond the committed offsets")
    return problems


def _lineage_problems(route: DemoRoute, records: list[dict], deployment) -> list[str]:
    """Every score record of ``route`` names the deployment in force, its role and the model's exact artifacts.

    The demo writes no control record, so that is the route's configured model (``deployment``),
    as primary.
    """
    want = {"deployment": deployment.id, "role": "primary", "sha256": deployment.primary.sha256}
    wrong = Counter()
    for rec in records:
        got = {"deployment": rec.get("deployment"), "role": rec.get("role"),
               "sha256": (rec.get("model") or {}).get("sha256")}
        for k, v in want.items():
            if got[k] != v:
                wrong[k] += 1
    return [f"{route.topic}: {n} score records lack {k}={want[k]!r}" for k, n in sorted(wrong.items())]


def _print_samples(route: DemoRoute, records: list[dict]) -> None:
    """The highest and lowest scores of the first records read back, with their lineage."""
    ranked = sorted(records[:SAMPLE_POOL], key=lambda r: -r["score"])
    picks = ranked[:SAMPLE_TOP] + ranked[-SAMPLE_BOTTOM:] if len(ranked) > SAMPLE_TOP else ranked
    for rec in picks:
        m, src = rec["model"], rec["source"]
        print(f"  {route.kind:<4} {rec['event_id']}  score={rec['score']:.4f} label={rec['label']}  "
              f"from {src['topic']}[{src['partition']}]@{src['offset']}  "
              f"model={m['name']}@{m['version']} sha256={m.get('sha256', '?')[:12]} role={rec.get('role')} "
              f"deployment={rec.get('deployment')}")


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


def demo_settings(bootstrap: str):
    """The demo worker's settings: one worker, both routes (what a deployment's TOML would say)."""
    return load_settings(
        None,
        environ={},
        kafka={"bootstrap_servers": bootstrap, "group_id": GROUP_ID, "replica_id": "demo-0",
               "session_timeout_ms": 6000},
        routes=[{"name": r.name, "input_topics": [r.topic], "scores": r.scores, "dlq": r.dlq,
                 "model": {"path": str(r.model)}} for r in ROUTES],
        metrics={"port": 0, "host": "127.0.0.1"},
        transactions={"commit_interval_ms": 100},
        drift={"recent_s": STATUS_PSI_WINDOW_S},
    )


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
        self.drift_announced = threading.Event()
        self.pipeline: Pipeline | None = None
        # Acknowledged records per input topic, and "error" if a traffic thread failed.
        self.produced: dict[str, int | str] = {}

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
        print(f"demo: devbroker at {bootstrap} (development only); one worker, {len(ROUTES)} routes:")
        for r in ROUTES:
            print(f"demo:   route {r.name}: {r.topic} ({r.kind} events, {r.share:.0%} of the traffic) -> "
                  f"models/{r.model.name} -> {r.scores}, dead letters {r.dlq}")
        admin = AdminClient({"bootstrap.servers": bootstrap, "logger": kafka_logger()})
        ensure_topics(admin, [r.topic for r in ROUTES], self.partitions)
        del admin  # librdkafka clients must be gone before the broker stops
        settings = demo_settings(bootstrap)
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

    def _traffic(self, bootstrap: str, route: DemoRoute, seed: int) -> None:
        """One route's events: half training-like, then half drifted, at its share of the rate."""
        rate = self.rate * route.share
        count = int(rate * self.duration)
        try:
            n = produce_telemetry(
                bootstrap, route.topic, kind=route.kind, count=count // 2, rate=rate, seed=seed,
                bad_fraction=BAD_FRACTION, stop=self.stop_traffic,
            )
            if not self.stop_traffic.is_set():
                if not self.drift_announced.is_set():
                    self.drift_announced.set()
                    print(f"demo: traffic now drifts (--drift {DRIFT_PHASE_MAGNITUDE})", flush=True)
                n += produce_telemetry(
                    bootstrap, route.topic, kind=route.kind, count=count - count // 2, rate=rate, seed=seed + 1,
                    bad_fraction=BAD_FRACTION, stop=self.stop_traffic, drift=DRIFT_PHASE_MAGNITUDE,
                )
            self.produced[route.topic] = n
        except Exception as exc:  # noqa: BLE001 - reported below, the demo then fails
            self.produced["error"] = f"{route.topic}: {exc}"

    def _drive(self, pipeline: Pipeline, bootstrap: str) -> int:
        """Traffic and status threads around pipeline.run(); the worker's exit code."""
        seed = int(time.time())
        traffic = [threading.Thread(target=self._traffic, args=(bootstrap, r, seed + 10 * i),
                                    name=f"demo-traffic-{r.name}", daemon=True) for i, r in enumerate(ROUTES)]

        def status():
            prev: dict = {}
            t0 = time.monotonic()
            caught_up_since = None
            while not pipeline._stop_requested:
                time.sleep(1.0)
                if pipeline._stop_requested:
                    break
                print(_status_line(pipeline, prev, time.monotonic() - t0), flush=True)
                if not any(t.is_alive() for t in traffic):
                    target = sum(self.produced.get(r.topic, -1) for r in ROUTES)
                    done = pipeline.stats.consumed >= target and not pipeline._inflight
                    if done or "error" in self.produced:
                        caught_up_since = caught_up_since or time.monotonic()
                        if time.monotonic() - caught_up_since >= 1.0:
                            pipeline.request_stop()
                    elif time.monotonic() - t0 > self.duration + CATCH_UP_TIMEOUT_S:
                        pipeline.request_stop()

        if not self.interrupted:
            for t in traffic:
                t.start()
            threading.Thread(target=status, name="demo-status", daemon=True).start()
        code = pipeline.run()
        self.stop_traffic.set()
        for t in traffic:
            if t.is_alive():
                t.join(TRAFFIC_JOIN_TIMEOUT_S)
        return code

    def _check(self, pipeline: Pipeline, settings, bootstrap: str, code: int) -> int:
        """Read the outputs back and check exactly-once, drift counts and lineage over what the group committed."""
        if self.interrupted:
            names = ", ".join(dict.fromkeys(signal.Signals(s).name for s in self.interrupted))
            print(f"demo: interrupted ({names}); worker stopped (exit {code}); checking what was processed so far",
                  flush=True)
        if "error" in self.produced:
            print(f"demo: traffic failed: {self.produced['error']}", file=sys.stderr)
            return ExitCode.FAILURE
        offsets = {r.topic: _input_offsets(bootstrap, r.topic, self.partitions) for r in ROUTES}
        processed = {t: sum(committed.values()) for t, (committed, _) in offsets.items()}
        records = _read_back(bootstrap, [t for r in ROUTES for t in (r.scores, r.dlq)],
                             lambda out: len(out) >= sum(processed.values()))
        scores = {r.name: [orjson.loads(m.value()) for m in records if m.topic() == r.scores] for r in ROUTES}
        dlq = {r.name: [m for m in records if m.topic() == r.dlq] for r in ROUTES}
        n_scored = sum(len(v) for v in scores.values())
        deltas = _read_back(bootstrap, [settings.topics.drift],
                            lambda out: sum(orjson.loads(m.value())["count"] for m in out) >= n_scored)
        counted: Counter = Counter()
        for m in deltas:
            d = orjson.loads(m.value())
            counted[d["model"]["name"]] += d["count"]

        problems: list[str] = []
        routes = {r.name: r for r in settings.effective_routes()}
        print("demo: sample scores (committed, read back with read_committed), with their lineage:")
        for r in ROUTES:
            if scores[r.name]:
                _print_samples(r, scores[r.name])
        reasons: Counter = Counter()
        for m in (m for r in ROUTES for m in dlq[r.name]):
            for k, v in m.headers() or []:
                if k == "sluice.error.reason":
                    reasons[v.decode()] += 1
        if reasons:
            print("demo: dead letters by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))

        # The demo writes no control record: each route runs its configured model as primary.
        deps = {r.name: initial_deployment(GROUP_ID, r.name, routes[r.name].model.path, routes[r.name].model.backend,
                                           routes[r.name].model.device) for r in ROUTES}
        for r in ROUTES:
            committed, ends = offsets[r.topic]
            acked = int(self.produced.get(r.topic, 0))  # acknowledged by the broker (the producer flushed)
            recs, dep = scores[r.name], deps[r.name]
            model = dep.primary.name
            lineage = _lineage_problems(r, recs, dep)
            own = [*_exactly_once_problems(r.topic, _output_sources(recs, dlq[r.name]), committed), *lineage]
            other_models = {rec["model"]["name"] for rec in recs} - {model}
            if other_models:
                own.append(f"{r.topic}: score records from {sorted(other_models)}, expected only {model}")
            if sum(ends.values()) != acked:
                own.append(f"{r.topic} holds {sum(ends.values())} records, the producer had {acked} acknowledged")
            if counted[model] != len(recs):
                own.append(f"drift deltas of {model} counted {counted[model]} events, {len(recs)} were scored")
            if not self.interrupted and processed[r.topic] != acked:
                own.append(f"{r.topic}: {acked - processed[r.topic]} produced records were not processed")
            print(f"demo: route {r.name}: {r.topic} -> {model} ({dep.id}): scored={len(recs)} dlq={len(dlq[r.name])} "
                  f"produced={acked} processed={processed[r.topic]} drift_counted={counted[model]} "
                  f"lineage={'ok' if not lineage else 'MISSING'} exactly_once={'ok' if not own else 'MISMATCH'}")
            problems += own
        unknown = set(counted) - {d.primary.name for d in deps.values()}
        if unknown:
            problems.append(f"drift deltas of models no route serves: {sorted(unknown)}")
        if not self.interrupted and code != ExitCode.OK:
            # Run to the end: the worker drained and exited 0.
            problems.append(f"the worker exited {code}")
        st = pipeline.stats
        n_dlq = sum(len(v) for v in dlq.values())
        print(
            f"demo: scored={n_scored} dlq={n_dlq} produced={sum(int(self.produced.get(r.topic, 0)) for r in ROUTES)} "
            f"processed={sum(processed.values())} drift_counted={sum(counted.values())} commits={st.commits} "
            f"aborts={st.aborts} p99_ms={st.latency_quantile(0.99) * 1000:.1f} "
            f"exactly_once={'ok' if not problems else 'MISMATCH'}"
            + (" (interrupted: checked over the processed records)" if self.interrupted else "")
        )
        for problem in problems:
            print(f"demo: MISMATCH: {problem}", file=sys.stderr)
        if problems:
            return ExitCode.FAILURE
        return ExitCode.INTERRUPTED if self.interrupted else ExitCode.OK
