"""``sluice demo``: the main job, end to end, on an embedded devbroker.

Starts a devbroker in a temporary directory, creates the topics, produces
synthetic flow telemetry at a steady rate with a small share of malformed
records, runs the worker, prints a status line per second and a few sample
scores, stops by itself, then reads the output topics back with
``read_committed`` and checks that every produced record has exactly one
score or dead letter.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from workers import logs
from workers.config import load_settings
from workers.kafka.admin import ensure_topics
from workers.kafka.telemetry_producer import produce_telemetry
from workers.metrics import Metrics, MetricsServer
from workers.pipeline import Pipeline

INPUT_TOPIC = "flows"
BAD_FRACTION = 0.01
# After traffic stops, how long the worker may take to catch up before the demo stops it anyway.
CATCH_UP_TIMEOUT_S = 20.0
MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "flow_classifier"
# The second half of the demo's traffic drifts by this magnitude (sluice produce --drift).
DRIFT_PHASE_MAGNITUDE = 1.0
# The status line's PSI covers this many seconds, so the drifting phase shows within seconds.
STATUS_PSI_WINDOW_S = 5.0
DRIFT_ALERT_PSI = 0.2


def _status_line(p: Pipeline, prev: dict, elapsed: float) -> str:
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
        f"[{elapsed:5.1f}s] consumed/s={consumed_s:7.0f} scored/s={scored_s:7.0f} dlq={st.dead_letters:5d} "
        f"batch={batch:6.1f} p99={p99:6.1f}ms lag={st.lag:5d} commits={st.commits:4d} max_psi={psi}{alert}"
    )


def _read_back(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list:
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"demo-reader-{topic}", "auto.offset.reset": "earliest",
        "isolation.level": "read_committed", "enable.auto.commit": False,
    })
    c.subscribe([topic])
    out: list = []
    deadline = time.monotonic() + timeout
    idle_since = time.monotonic()
    while time.monotonic() < deadline:
        msgs = c.consume(10_000, 0.5)
        good = [m for m in msgs if m.error() is None]
        out.extend(good)
        if good:
            idle_since = time.monotonic()
        elif len(out) >= expect and time.monotonic() - idle_since > 1.0:
            break
    c.close()
    return out


def run_demo(duration: float = 30.0, rate: float = 5000.0, partitions: int = 4) -> int:
    from devbroker import DevBroker

    logs.setup("WARNING", "text")
    duration = min(duration, 60.0)
    with tempfile.TemporaryDirectory(prefix="sluice-demo-") as tmp, DevBroker(
        data_dir=Path(tmp) / "broker", partitions=partitions
    ) as broker:
        print(f"demo: devbroker at {broker.bootstrap} (development only), model {MODEL_PATH.name}")
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        ensure_topics(admin, [INPUT_TOPIC], partitions)
        del admin  # librdkafka clients must be gone before the broker stops
        settings = load_settings(
            None,
            environ={},
            kafka={"bootstrap_servers": broker.bootstrap, "group_id": "sluice-demo", "input_topics": [INPUT_TOPIC],
                   "replica_id": "demo-0", "session_timeout_ms": 6000},
            model={"path": str(MODEL_PATH)},
            metrics={"port": 0, "host": "127.0.0.1"},
            transactions={"commit_interval_ms": 100},
            drift={"recent_s": STATUS_PSI_WINDOW_S},
        )
        metrics = Metrics()
        server = MetricsServer(metrics, "127.0.0.1", 0).start()
        pipeline = Pipeline(settings, metrics)
        pipeline.start()
        print(f"demo: worker ready; metrics at http://127.0.0.1:{server.port}/metrics; "
              f"offering {rate:.0f} events/s for {duration:.0f}s with {BAD_FRACTION:.0%} malformed records")
        print(f"demo: first half training-like traffic, second half drifted (--drift {DRIFT_PHASE_MAGNITUDE}); "
              f"max_psi is over the last {STATUS_PSI_WINDOW_S:.0f}s, DRIFT at >= {DRIFT_ALERT_PSI}")

        count = int(rate * duration)
        produced: dict = {}
        stop_traffic = threading.Event()

        def traffic():
            seed = int(time.time())
            try:
                n = produce_telemetry(
                    broker.bootstrap, INPUT_TOPIC, count=count // 2, rate=rate, seed=seed,
                    bad_fraction=BAD_FRACTION, stop=stop_traffic,
                )
                if not stop_traffic.is_set():
                    print(f"demo: traffic now drifts (--drift {DRIFT_PHASE_MAGNITUDE})", flush=True)
                    n += produce_telemetry(
                        broker.bootstrap, INPUT_TOPIC, count=count - count // 2, rate=rate, seed=seed + 1,
                        bad_fraction=BAD_FRACTION, stop=stop_traffic, drift=DRIFT_PHASE_MAGNITUDE,
                    )
                produced["n"] = n
            except Exception as exc:  # noqa: BLE001 - reported below, the demo then fails
                produced["error"] = str(exc)

        def status():
            prev: dict = {}
            t0 = time.monotonic()
            caught_up_since = None
            while not pipeline._stop_requested:
                time.sleep(1.0)
                print(_status_line(pipeline, prev, time.monotonic() - t0), flush=True)
                if not producer_thread.is_alive():
                    target = produced.get("n", -1)
                    done = pipeline.stats.consumed >= target and not pipeline._inflight
                    if done or "error" in produced:
                        caught_up_since = caught_up_since or time.monotonic()
                        if time.monotonic() - caught_up_since >= 1.0:
                            pipeline.request_stop()
                    elif time.monotonic() - t0 > duration + CATCH_UP_TIMEOUT_S:
                        pipeline.request_stop()

        def on_signal(signum, _frame):
            stop_traffic.set()
            pipeline.request_stop()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        producer_thread = threading.Thread(target=traffic, name="demo-traffic", daemon=True)
        producer_thread.start()
        status_thread = threading.Thread(target=status, name="demo-status", daemon=True)
        status_thread.start()
        code = pipeline.run()
        server.stop()
        stop_traffic.set()
        producer_thread.join(10)
        if "error" in produced:
            print(f"demo: traffic failed: {produced['error']}", file=sys.stderr)
            return 1

        n = produced.get("n", 0)
        scores = _read_back(broker.bootstrap, settings.topics.scores, 0)
        dlq = _read_back(broker.bootstrap, settings.topics.dlq, 0, timeout=10.0)
        deltas = _read_back(broker.bootstrap, settings.topics.drift, 0, timeout=10.0)
        counted = sum(orjson.loads(m.value())["count"] for m in deltas)
        print("demo: sample scores (committed, read back with read_committed):")
        ranked = sorted((orjson.loads(m.value()) for m in scores[:5000]), key=lambda r: -r["score"])
        for rec in ranked[:3] + ranked[-2:]:
            print(f"  {rec['event_id']}  score={rec['score']:.4f} label={rec['label']}  "
                  f"from {rec['source']['topic']}[{rec['source']['partition']}]@{rec['source']['offset']}")
        reasons: dict[str, int] = {}
        for m in dlq:
            for k, v in m.headers() or []:
                if k == "sluice.error.reason":
                    reasons[v.decode()] = reasons.get(v.decode(), 0) + 1
        if reasons:
            print("demo: dead letters by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
        ok = len(scores) + len(dlq) == n and counted == len(scores) and code == 0
        st = pipeline.stats
        print(
            f"demo: scored={len(scores)} dlq={len(dlq)} produced={n} drift_counted={counted} commits={st.commits} "
            f"aborts={st.aborts} p99_ms={st.latency_quantile(0.99) * 1000:.1f} "
            f"exactly_once={'ok' if ok else 'MISMATCH'}"
        )
        return 0 if ok else 1
