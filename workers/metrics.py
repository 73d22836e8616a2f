"""Prometheus metrics and the /metrics, /healthz, /readyz server.

Per-event quantities (end-to-end latency) are recorded a batch at a time into
:class:`BatchHistogram`, which keeps numpy bucket counts and exports them as a
regular Prometheus histogram: ``Histogram.observe`` per event would cost about
a microsecond each on the hot path.
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Iterable

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# The liveness probe fails when the orchestrator loop has not turned for this long
# (a wedged loop stops heartbeating the group long before that).
LIVENESS_STALL_S = 60.0
# Every reason the pipeline aborts a transaction for (the `reason` label of
# sluice_transactions_aborted_total). Each series exists at 0 from the start, so
# rate()/increase() and "absent" alerts work before the first abort.
ABORT_REASONS = ("produce_failed", "commit_failed", "revoke_timeout", "partitions_lost", "consumer_fenced", "shutdown")

# A `<name>_created` sample per counter and histogram series doubles the series count for
# a timestamp nobody queries (rate() copes with restarts without it). Process-wide switch.
disable_created_metrics()


class BatchHistogram:
    """A histogram fed with numpy arrays; a Prometheus collector."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]):
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        idx = np.searchsorted(self.bounds, values, side="left")
        counts = np.bincount(idx, minlength=len(self.bounds) + 1)
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self):
        with self._lock:
            cum = np.cumsum(self._counts).tolist()
            total = self._sum
        buckets = [(repr(float(b)), c) for b, c in zip(self.bounds.tolist(), cum[:-1])]
        buckets.append(("+Inf", cum[-1]))
        fam = HistogramMetricFamily(self.name, self.documentation)
        fam.add_metric([], buckets, total)
        yield fam


class Metrics:
    """Every metric the worker exports, on a private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.consumed = Counter("sluice_events_consumed", "Input records consumed.", ["topic"], registry=r)
        self.scored = Counter("sluice_events_scored", "Score records emitted (committed or not).", ["model"], registry=r)
        self.dead_lettered = Counter(
            "sluice_events_dead_lettered", "Dead letters emitted, by reason.", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "sluice_batch_size", "Events per inference batch (inferences / executions).", buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "sluice_batch_queue_wait_seconds", "Time a batch waited for an inference thread.", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "sluice_inference_seconds", "Backend time per batch.", ["model", "backend"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = BatchHistogram(
            "sluice_end_to_end_latency_seconds", "Event timestamp (its ts field) to score emitted.", LATENCY_BUCKETS
        )
        r.register(self.e2e_latency)
        self.txn_committed = Counter("sluice_transactions_committed", "Transactions committed.", registry=r)
        self.txn_aborted = Counter("sluice_transactions_aborted", "Transactions aborted.", ["reason"], registry=r)
        for reason in ABORT_REASONS:
            self.txn_aborted.labels(reason)
        self.producer_renewals = Counter(
            "sluice_producer_renewals",
            "Transactional producers replaced after a commit or abort of unknown outcome (a new epoch).",
            registry=r,
        )
        self.commit_seconds = Histogram(
            "sluice_commit_seconds", "send_offsets + commit_transaction time.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inflight_batches = Gauge("sluice_inflight_batches", "Batches submitted and not yet emitted.", registry=r)
        self.paused_partitions = Gauge("sluice_paused_partitions", "Partitions paused by backpressure.", registry=r)
        self.assigned_partitions = Gauge("sluice_assigned_partitions", "Partitions assigned to this replica.", registry=r)
        self.consumer_lag = Gauge(
            "sluice_consumer_lag", "Records behind the partition's end (from librdkafka stats).", ["topic", "partition"],
            registry=r,
        )
        self.rebalances = Counter("sluice_rebalances", "Partitions assigned / revoked / lost.", ["event"], registry=r)
        self.model_info = Info("sluice_model", "The served model.", registry=r)
        self.drift_psi = Gauge(
            "sluice_drift_psi", "PSI of this replica's recent traffic against the training baseline.",
            ["model", "feature"], registry=r,
        )
        self.ready_gauge = Gauge("sluice_ready", "1 when /readyz answers 200.", registry=r)
        # Model lifecycle: per route and role (primary, canary, shadow).
        self.deployment_info = Gauge(
            "sluice_deployment_info", "1 per model of the deployment each route runs now.",
            ["route", "role", "deployment", "model", "version", "sha256"], registry=r,
        )
        self.deployment_events = Counter(
            "sluice_deployment_events",
            "Deployments loaded, applied (first outputs), refused, and canaries rolled back by the guard.",
            ["route", "event"], registry=r,
        )
        self.switch_seconds = Gauge(
            "sluice_deployment_switch_seconds",
            "From a deployment's pool being warm to its first output being produced (the switch's stall).",
            ["route"], registry=r,
        )
        self.route_scored = Counter(
            "sluice_route_events_scored", "Score records per route and role (committed or not).", ["route", "role"],
            registry=r,
        )
        self.route_inference = Histogram(
            "sluice_route_batch_seconds", "Scoring time per batch and route (every model of the deployment).",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.control_follower_ok = Gauge(
            "sluice_control_follower_ok",
            "1 while the control topic is followed without errors (0: new deployments are not seen).", registry=r,
        )
        self.degraded = Gauge(
            "sluice_route_degraded", "1 while a route serves its fallback model under pressure ([degrade]).",
            ["route"], registry=r,
        )
        self.shadow_compared = Counter(
            "sluice_shadow_compared", "Events scored by both a shadow model and the primary or canary.",
            ["route", "model", "version"], registry=r,
        )
        self.shadow_agreed = Counter(
            "sluice_shadow_agreed", "... of those, events whose label the shadow model agrees on.",
            ["route", "model", "version"], registry=r,
        )
        self.alive_at = time.monotonic()
        self.ready = False
        self.not_ready_reason = "starting"

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready = ready
        self.not_ready_reason = reason
        self.ready_gauge.set(1 if ready else 0)

    def heartbeat(self) -> None:
        self.alive_at = time.monotonic()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Handler(http.server.BaseHTTPRequestHandler):
    metrics: Metrics

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        m = self.metrics
        if self.path.startswith("/metrics"):
            self._send(200, m.render(), CONTENT_TYPE_LATEST)
        elif self.path.startswith("/healthz"):
            stalled = time.monotonic() - m.alive_at
            if stalled < LIVENESS_STALL_S:
                self._send(200, b"ok\n")
            else:
                self._send(503, f"orchestrator loop stalled for {stalled:.0f}s\n".encode())
        elif self.path.startswith("/readyz"):
            if m.ready:
                self._send(200, b"ready\n")
            else:
                self._send(503, f"not ready: {m.not_ready_reason}\n".encode())
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # probes every few seconds are not news
        pass


class MetricsServer:
    """Serves the metrics and probes on a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        handler = type("Handler", (_Handler,), {"metrics": metrics})
        self._server = http.server.ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="sluice-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
