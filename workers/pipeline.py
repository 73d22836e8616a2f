"""The orchestrator: poll → batch → featurize → infer → emit → commit.

Guarantee (exactly once, end to end): every input offset ends in exactly one
committed score record or dead letter, because outputs and the consumer
offsets that cover them are committed in one Kafka transaction, and a
restarted or rebalanced replica resumes from the committed offsets. Readers
must use ``isolation.level=read_committed``. Limits: a transaction not
committed within ``transaction.timeout.ms`` is aborted by the broker and redone;
a fenced producer exits (the supervisor restarts it).

The commit protocol, as in DESIGN.md:

1. ``begin_transaction()`` when the first output of a new transaction is emitted.
2. Emit score records and dead letters of completed batches, in submission order,
   and add the scored rows to the model's drift delta.
3. Every ``commit_interval_ms``, when the pipeline goes idle, and on revoke and
   shutdown: produce the drift delta of this transaction, then
   ``send_offsets_to_transaction(next offsets of everything emitted, group
   metadata)``, then ``commit_transaction()``.
4. Abortable error: ``abort_transaction()``, drop in-flight work, rewind every
   assigned partition to its last committed offset, go on.
5. Fatal error (fenced, unknown producer): stop, exit non-zero.
6. Partitions revoked: finish the in-flight work, commit, then return from the
   callback, within ``revoke_timeout_ms``; past it, abort and rewind instead.
7. Shutdown: stop consuming, drain, commit, close. A second signal or
   ``shutdown_timeout_ms`` aborts instead; nothing committed is ever lost.

One thread (the caller of :meth:`Pipeline.run`) owns the consumer and every
transaction call; batches are featurized, scored and encoded in the scoring
processes of :class:`workers.inference.pool.ScoringPool` (or its threads). What one
transaction has taken lives in a :class:`workers.transaction.Transaction`; a new one
follows every commit and abort.

Routes and deployments: each route (``[[routes]]``, or the one implied by ``[model]``) has
its own scoring pool holding its deployment's models (primary, canary, shadows). A new
deployment from the control topic is loaded in a new pool in the background
(:mod:`workers.lifecycle`); new batches go to it once it is warm. Outputs of two
deployments never share a transaction: the open one is committed before the first output
of the new deployment, and the first outputs of a deployment on each partition carry an
``applied`` audit record (its first offset) in the same transaction.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import subprocess
import sys
import time
import threading
from collections import Counter, deque
from concurrent.futures import BrokenExecutor, Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from workers import __version__
from workers.batching import MicroBatcher
from workers.config import RouteSettings, Settings
from workers.control import Deployment, ModelRef, artifacts_sha256, audit_record, initial_deployment
from workers.drift import DriftAccumulator
from workers.exit_codes import BrokerUnavailable, ConfigError, ExitCode
from workers.kafka.rewind import RewindFailed, rewind_to_committed
from workers.features import ModelSpec
from workers.inference.pool import ScoringPool, ScoringTimeout
from workers.lifecycle import CanaryGuard, ControlFollower, DeploymentLoader, read_control
from workers.kafka import settings as kafka_settings
from workers.kafka.admin import (
    StartupErrorLog,
    TopicError,
    ensure_topics,
    is_authorization_error,
    last_client_error,
    partition_counts,
)
from workers.kafka.producer import (
    AbortableError,
    FatalProducerError,
    IndefiniteOutcome,
    TransactionalProducer,
    TransactionStuck,
)
from workers.metrics import Metrics
from workers.records import dead_letter
from workers.scoring import ScoredBatch, ScorerConfig
from workers.transaction import Transaction

log = logging.getLogger(__name__)

# Longest single consume() call: bounds how late a signal, a commit deadline or
# a completed batch is noticed.
MAX_POLL_WAIT_S = 0.1
# Longest consume() wait while batches are in flight: results are read between polls (the
# scoring processes' pipes are worked by this thread), so this bounds how late one is seen.
INFLIGHT_POLL_WAIT_S = 0.005
# ... and while a batch waits for room in a scoring process's pipe, which must not idle for it.
WRITING_POLL_WAIT_S = 0.001
# While the in-flight queue is full, wait this long on the oldest batch before looking again
# (at the commit interval, a signal, and, once paused, the group membership through a poll).
BACKPRESSURE_WAIT_S = 0.01
# Pause the partitions only when the in-flight queue has stayed full this long. Full is the
# normal state at full load, and a pause drops what librdkafka has prefetched for the partition
# (fetched again on resume): pausing at every full queue cut throughput 20x (sluice bench).
# Until then nothing is consumed, so memory stays bounded by the prefetch limits either way;
# the bound is far below max.poll.interval.ms, so a slow model never costs the membership.
BACKPRESSURE_PAUSE_AFTER_S = 1.0
# Resume paused partitions once in-flight batches drop to this share of the limit,
# so pause/resume does not flap at the boundary.
RESUME_FRACTION = 0.5
# Exit codes the loop can end with (the full table: workers/exit_codes.py).
EXIT_FENCED = ExitCode.FENCED      # producer or consumer fenced by another process with this replica id
EXIT_TEMPFAIL = ExitCode.TEMPFAIL  # the cluster failed us (e.g. committed offsets unreadable); a restart may succeed
EXIT_SOFTWARE = ExitCode.SOFTWARE  # an unexpected error (a bug): the open transaction is aborted, nothing committed is lost

# Fetching committed offsets when rewinding after an abort.
COMMITTED_TIMEOUT_S = 15.0
# One commit (send_offsets + commit_transaction) outside the revoke and shutdown paths,
# which pass what is left of their own budget instead.
COMMIT_TIMEOUT_S = 30.0
# The abort at the end of a forced or failed shutdown, after shutdown_timeout_ms. It takes
# milliseconds when the broker answers; when it cannot (broker down), the broker's transaction
# timeout or the partitions' next owner aborts the transaction anyway, so waiting longer only
# delays the exit (CI saw 20 s past SIGTERM with the broker down when it had 5 s plus librdkafka's
# own overrun, then a revoke at consumer close tried to commit again).
CLOSE_ABORT_TIMEOUT_S = 2.0
# Cyclic-GC generation-0 threshold on the hot path (CPython's default is 700 allocations). The
# loop allocates a few objects per event and creates almost no reference cycles, so the default
# ran a collection every few dozen events; measured +12% events/s (sluice bench) at 50 000.
GC_GEN0_THRESHOLD = 50_000

# PSI gauges are recomputed at most this often (a PSI over every feature per commit is waste).
DRIFT_GAUGE_INTERVAL_S = 1.0
# A static member can be fenced with no other instance anywhere: on Apache Kafka, when the
# group coordinator fails over, librdkafka's rejoin may race its own old member id and get
# FENCED_INSTANCE_ID (seen in tests/integration/test_kafka_cluster_faults.py). The consumer is
# then unusable, but the producer is not fenced, so the replica re-creates its consumer instead
# of exiting. A genuine duplicate also fences the producer (same transactional.id), which ends
# the worker with exit 3; more than this many consumer fences within the window end it too.
CONSUMER_REFENCE_LIMIT = 3
CONSUMER_REFENCE_WINDOW_S = 60.0
# A deployment's models pass `sluice models check` (artifacts, schema, generated events, parity)
# in a child process before they are loaded: the check may import torch, which must not
# inflate the worker. Past this it is refused (a check takes a few seconds here).
MODEL_CHECK_TIMEOUT_S = 300.0
MODEL_CHECK_EVENTS = 500
# Lifecycle housekeeping (guard verdicts, retiring old pools) runs at most this often.
LIFECYCLE_TICK_S = 1.0
# Degradation judges the end-to-end p99 of the batches emitted in this last window: long enough
# to hold several batches at any load, short enough that a drained backlog ends the pressure.
PRESSURE_WINDOW_S = 2.0
# While degraded the fallback keeps lag and p99 low, so their calm alone says nothing about the
# primary: the route recovers only when the input rate is also below this share of what the
# primary emitted while it was saturated (its measured capacity). Without it the route went back
# in the middle of a burst and degraded again (scripts/measure-lifecycle degrade, recover_after_s=6).
RECOVER_LOAD_FRACTION = 0.8
# Input and output rates are judged over this many lifecycle ticks (LIFECYCLE_TICK_S each).
RATE_TICKS = 3


class Route:
    """One route's live state: its deployment, the pool that scores it, its canary guard."""

    def __init__(self, settings: RouteSettings, deployment: Deployment, pool: ScoringPool, specs: dict[str, ModelSpec]):
        self.settings = settings
        self.name = settings.name
        self.deployment = deployment
        self.pool = pool
        self.specs = specs                      # role -> ModelSpec of the deployment (primary, canary)
        self.guard = CanaryGuard(settings.guard) if settings.guard.enabled else None
        self.loader: DeploymentLoader | None = None
        self.refused: set[str] = set()          # deployment ids that failed to load or check
        self.guard_tripped: str | None = None   # the deployment whose canary this replica rolled back
        self.switched_at: float | None = None   # monotonic time the current deployment took over
        # Graceful degradation (settings.degrade): a warm fallback pool and the state of the pressure.
        self.fallback: tuple[Deployment, ScoringPool] | None = None
        self.saved: tuple[Deployment, ScoringPool, dict] | None = None  # the deployment it stands in for
        self.pressure_since: float | None = None
        self.calm_since: float | None = None
        self.recent_p99: deque[tuple[float, float]] = deque(maxlen=256)  # (emit time, batch p99 s)
        self.consumed = 0        # events submitted for scoring on this route
        self.emitted = 0         # events emitted from batches of the route's own (not fallback) models
        self.rates: deque[tuple[float, int, int]] = deque(maxlen=RATE_TICKS + 1)  # (time, consumed, emitted)
        self.capacity = 0.0      # events/s the primary emitted while saturated (measured when degrading)


class StopWorker(Exception):
    """Raised inside the loop to leave it; ``exit_code`` says how."""

    def __init__(self, exit_code: int, reason: str):
        super().__init__(reason)
        self.exit_code = exit_code


@dataclass
class Batch:
    """Messages of one scoring batch and what the orchestrator needs to emit them."""

    msgs: list[Message]
    keys: list[bytes | None]
    next_offsets: dict[tuple[str, int], int]  # per partition: the offset after the batch's last message
    future: Future | None = None
    route: Route | None = None
    deployment: Deployment | None = None      # whose models scored it (the route's when submitted)


@dataclass
class Stats:
    """Plain counters for the CLI status line and the bench (metrics hold the same for Prometheus)."""

    consumed: int = 0
    scored: int = 0
    dead_letters: int = 0
    batches: int = 0
    batch_events: int = 0
    commits: int = 0
    aborts: int = 0
    first_fetch_at: float | None = None
    last_commit_at: float | None = None
    lag: int = 0
    max_psi: float = math.nan
    recent_latency: deque = field(default_factory=lambda: deque(maxlen=64))  # numpy arrays, last batches
    # When a list: every batch's (emit time, latencies) too (the bench's whole-run percentiles).
    latency_log: list | None = None

    def latency_quantile(self, q: float) -> float:
        if not self.recent_latency:
            return math.nan
        return float(np.quantile(np.concatenate(list(self.recent_latency)), q))


@dataclass(frozen=True)
class Snapshot:
    """What the pipeline holds and has done, copied at one moment (for tests, the bench, tools).

    Safe to take from another thread: every field is copied, nothing refers into the pipeline.
    """

    held_events: int        # consumed and not yet emitted: the open batch plus in-flight batches
    inflight_batches: int
    paused: bool            # partitions paused by backpressure
    assigned: frozenset     # (topic, partition) owned now
    consumed: int
    scored: int
    dead_letters: int
    commits: int
    aborts: int
    deployments: dict       # route -> the deployment id new batches go to
    degraded: frozenset     # routes serving their fallback


class Pipeline:
    """One worker process: a consumer, a transactional producer, an inference pool."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stats = Stats()
        self.worker_name = f"{settings.kafka.group_id}/{settings.kafka.replica_id}/{os.getpid()}"
        self._stop_requested = False
        self._force_stop = False
        # Monotonic: set by the first stop request (SIGTERM + shutdown_timeout_ms); every
        # transactional call still running then is given up (see TransactionalProducer.stop_by).
        self._stop_deadline: float | None = None
        self._closing = False  # in _close: a revoke or loss from consumer.close() only unassigns
        self._running = False  # in run(): stop requests bound the producer's calls
        self._aborted_at_stop = False
        self._drain_deadline: float | None = None  # set while draining for a revoke or a shutdown
        self._assigned: set[tuple[str, int]] = set()
        self._consumer_fences: list[float] = []  # monotonic times the consumer was fenced (see CONSUMER_REFENCE_LIMIT)
        # Partitions rewound (aborted) while a _consume call was under way: messages of theirs
        # returned by that call predate the rewind and must not be batched.
        self._rewound: set[tuple[str, int]] = set()
        # Bumped by every rebalance callback and rewind, so _consume filters its messages
        # only when one ran during the call (filtering costs ~0.5 us per message).
        self._epoch = 0
        self._paused = False
        self._lag_by_topic: dict[str, int] = {}  # input topic -> lag of this replica's partitions of it
        self._full_since: float | None = None  # when the in-flight queue last became full
        self._inflight: deque[Batch] = deque()
        self.txn: Transaction | None = None  # the open (or next) transaction
        self._drift_gauges_at = 0.0
        self._drift: dict[tuple[str, str], DriftAccumulator] = {}  # (model, version) -> its deltas
        self.consumer: Consumer | None = None
        self.producer: TransactionalProducer | None = None
        self.routes: dict[str, Route] = {}
        self._route_of: dict[str, Route] = {}       # input topic -> route
        self._single_route: Route | None = None
        # Committed `applied` audits: partition -> the deployment its outputs come from.
        self._applied: dict[tuple[str, int], str] = {}
        self._retiring: list[ScoringPool] = []      # pools of replaced deployments, shut down when unused
        self._follower: ControlFollower | None = None
        self._lifecycle_at = 0.0
        self._checked: set[str] = set()             # sha256 of models that passed `models check` here
        self.worker_lineage = {"replica": settings.kafka.replica_id, "version": __version__,
                               "config_sha256": settings.config_sha256()}

    def snapshot(self) -> Snapshot:
        """A read-only copy of the pipeline's state (see :class:`Snapshot`)."""
        inflight = list(self._inflight)
        batcher = getattr(self, "batcher", None)
        st = self.stats
        return Snapshot(
            held_events=(len(batcher) if batcher is not None else 0) + sum(len(b.msgs) for b in inflight),
            inflight_batches=len(inflight), paused=self._paused, assigned=frozenset(self._assigned),
            consumed=st.consumed, scored=st.scored, dead_letters=st.dead_letters, commits=st.commits,
            aborts=st.aborts, deployments={n: r.deployment.id for n, r in list(self.routes.items())},
            degraded=frozenset(n for n, r in list(self.routes.items()) if r.saved is not None),
        )

    @property
    def pool(self) -> ScoringPool | None:
        """The first route's pool (the only one of a single-model worker)."""
        return next(iter(self.routes.values())).pool if self.routes else None

    @property
    def spec(self) -> ModelSpec:
        """The first route's primary model."""
        return next(iter(self.routes.values())).specs["primary"]

    # ------------------------------------------------------------------ setup

    def start(self) -> None:
        """Load and warm the model, check topics, init transactions, subscribe."""
        s = self.settings
        self._sizes = tuple(sorted({1, s.batching.max_batch_size}
                                   | {2**i for i in range(1, 16) if 2**i < s.batching.max_batch_size}))
        # Scoring executors first: a model that cannot load fails the start before any Kafka client
        # exists, and spawning them before librdkafka's threads keeps the processes lean.
        try:
            for rs in s.effective_routes():
                dep = initial_deployment(s.kafka.group_id, rs.name, rs.model.path, rs.model.backend, rs.model.device)
                pool = self._new_pool(rs, dep)
                route = self.routes[rs.name] = Route(rs, dep, pool, self._specs(dep))
                pool.start()
                self._checked.add(dep.primary.sha256)
                if rs.degrade.enabled:
                    self._start_fallback(route)
                for t in rs.input_topics:
                    self._route_of[t] = route
            if len(self.routes) == 1:
                self._single_route = next(iter(self.routes.values()))
            self._start_clients()
            self._apply_startup_deployments()
            # Subscribe last: partitions assigned to this replica would otherwise wait (owned,
            # unscored) while the start-up deployments are checked and warmed.
            self.consumer = self._new_consumer()
        except BaseException:
            # Leave no scoring process behind a start that failed (the CLI exits 2 or 75).
            for route in self.routes.values():
                route.pool.shutdown(wait=True, cancel=True)
                if route.fallback is not None:
                    route.fallback[1].shutdown(wait=True, cancel=True)
            raise
        for route in self.routes.values():
            self._publish_deployment_metrics(route, None)
        # Start-up objects (model, clients, modules) live as long as the process: keep them out
        # of every future collection, then collect the hot path's garbage less often.
        gc.collect()
        gc.freeze()
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
        # Ready: model warm, producer initialised, subscribed. A replica without partitions
        # (more replicas than partitions) is ready too: it takes over on the next rebalance.
        self.metrics.set_ready(True)

    def _start_clients(self) -> None:
        """Check topics, init transactions, subscribe."""
        s = self.settings
        self.metrics.model_info.info(
            {"name": self.spec.name, "version": self.spec.version, "backend": s.model.backend, "device": s.model.device}
        )

        admin_conf = kafka_settings.admin_config(s)
        errors = StartupErrorLog(admin_conf.get("logger"))
        admin = AdminClient({**admin_conf, "error_cb": errors, "logger": errors})
        try:
            counts = partition_counts(admin)
        except KafkaException as exc:
            errors.raise_for(exc, s.kafka.bootstrap_servers, s.kafka.client)
            raise BrokerUnavailable(f"the cluster at bootstrap servers {s.kafka.bootstrap_servers} did not answer: "
                                    f"{exc.args[0].str()}{last_client_error(errors, s.kafka.client)}") from exc
        missing = [t for t in s.kafka.input_topics if t not in counts]
        if missing:
            raise TopicError(
                f"input topic(s) {missing} do not exist on {s.kafka.bootstrap_servers}; create them or fix "
                "[kafka] input_topics"
            )
        if s.topics.create:
            parts = s.topics.partitions or counts[s.kafka.input_topics[0]]
            outputs = [s.topics.scores, s.topics.dlq, s.topics.drift, s.topics.shadow, s.topics.audit]
            outputs += [r.settings.scores for r in self.routes.values()] + [r.settings.dlq for r in self.routes.values()]
            created = ensure_topics(admin, outputs, parts, s.topics.replication_factor)
            # One record per route: compacted, so the latest deployment is always there to read.
            created += ensure_topics(admin, [s.topics.control], 1, s.topics.replication_factor,
                                     config={"cleanup.policy": "compact"})
            if created:
                log.info("created output topics", extra={"topics": created, "partitions": parts})

        self.producer = TransactionalProducer(kafka_settings.producer_config(s))
        self.producer.init()
        self.txn = Transaction(self.producer)
        self.batcher: MicroBatcher[Message] = MicroBatcher(
            s.batching.max_batch_size, s.batching.max_batch_delay_ms / 1000.0, s.batching.adaptive
        )

    # ------------------------------------------------------------ deployments

    def _scorer_config(self, rs: RouteSettings, dep: Deployment) -> ScorerConfig:
        """What a scoring executor needs for a deployment: every model with its lineage."""
        s = self.settings
        worker = tuple(self.worker_lineage.items())

        def one(ref: ModelRef, role: str, drift: bool) -> ScorerConfig:
            return ScorerConfig(Path(ref.path), ref.backend or rs.model.backend, ref.device or rs.model.device,
                                s.inference.intra_op_threads, self._sizes, drift=drift, role=role,
                                deployment=dep.id, sha256=ref.sha256, worker=worker)

        cfg = one(dep.primary, "primary", s.drift.enabled)
        canary = one(dep.canary, "canary", s.drift.enabled) if dep.canary is not None else None
        shadow = tuple(one(m, "shadow", False) for m in dep.shadow)
        return replace(cfg, canary=canary, fraction=dep.fraction, shadow=shadow)

    def _new_pool(self, rs: RouteSettings, dep: Deployment) -> ScoringPool:
        s = self.settings
        return ScoringPool(self._scorer_config(rs, dep), processes=s.inference.processes,
                           threads=s.inference.threads, log_level=s.logging.level, log_format=s.logging.format)

    @staticmethod
    def _specs(dep: Deployment) -> dict[str, ModelSpec]:
        specs = {"primary": ModelSpec.load(dep.primary.path)}
        if dep.canary is not None:
            specs["canary"] = ModelSpec.load(dep.canary.path)
        return specs

    def _build_deployment(self, rs: RouteSettings, dep: Deployment) -> ScoringPool:
        """Check a deployment's models and start a warm pool for it (any error refuses it).

        Runs in a loader thread: the checks are child processes (all at once), and models
        already running or checked before (same sha256) are not checked again.
        """
        checks = []
        for role, ref in dep.models():
            digest = artifacts_sha256(ref.path)
            if digest != ref.sha256:
                raise ValueError(f"{role} model at {ref.path}: its artifacts changed since the deployment "
                                 f"was written (sha256 {digest[:12]}, the deployment says {ref.sha256[:12]})")
            if ref.sha256 in self._checked:
                continue
            checks.append((role, ref, subprocess.Popen(
                [sys.executable, "-m", "workers", "models", "check", str(ref.path), "--events", str(MODEL_CHECK_EVENTS)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        failures = []
        for role, ref, proc in checks:
            try:
                out, _ = proc.communicate(timeout=MODEL_CHECK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                failures.append(f"{role} model at {ref.path}: `sluice models check` took over {MODEL_CHECK_TIMEOUT_S:.0f}s")
                continue
            if proc.returncode != 0:
                failed = [ln for ln in out.splitlines() if ln.startswith("FAIL")] or out.strip().splitlines()[-1:]
                failures.append(f"{role} model at {ref.path} fails `sluice models check`: " + "; ".join(failed))
            else:
                self._checked.add(ref.sha256)
        if failures:
            raise ValueError(" | ".join(failures))
        pool = self._new_pool(rs, dep)
        try:
            pool.start()
        except BaseException:
            pool.shutdown(wait=True, cancel=True)
            raise
        return pool

    def _apply_startup_deployments(self) -> None:
        """Before anything is scored: the latest deployment of each route on the control topic."""
        try:
            latest, control_ends = read_control(self.settings)
        except (KafkaException, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot read the control topic {self.settings.topics.control!r}: {exc}") from exc
        for name, dep in latest.items():
            route = self.routes.get(name)
            if route is None or dep.id == route.deployment.id:
                continue
            log.info("applying the route's deployment before scoring", extra={"route": name, "deployment": dep.id})
            try:
                pool = self._build_deployment(route.settings, dep)
            except Exception as exc:  # noqa: BLE001 - refused; the route keeps its configured model
                self._refuse(route, dep, f"{type(exc).__name__}: {exc}")
                continue
            self._switch(route, dep, pool)
        self._follower = ControlFollower(self.settings, set(self.routes), start=control_ends)
        self._follower.start()

    def _refuse(self, route: Route, dep: Deployment, error: str) -> None:
        route.refused.add(dep.id)
        log.error("deployment refused; the route keeps its current deployment",
                  extra={"route": route.name, "deployment": dep.id, "error": error, "current": route.deployment.id})
        self.metrics.deployment_events.labels(route.name, "refused").inc()
        self._add_record(self.settings.topics.audit, dep.key, audit_record(
            "refused", dep, replica=self.settings.kafka.replica_id, worker=self.worker_lineage, error=error,
            extra={"kept": route.deployment.id}))

    def _add_record(self, topic: str, key: bytes, value: bytes) -> None:
        """A record for the open transaction (or the next one, if the producer is between)."""
        if self.producer.failed is not None:
            return
        try:
            self.txn.add_record(topic, key, value)
        except AbortableError as exc:
            # The open transaction had failed already: abort and rewind as _emit would; the
            # record is carried into the next transaction (Transaction.add_record keeps it).
            log.warning("produce failed; aborting and rewinding", extra={"error": str(exc)})
            self._abort_and_rewind("produce_failed")

    def _start_fallback(self, route: Route) -> None:
        """Load and warm the route's fallback at start, so degrading costs no load time."""
        s, d = self.settings, route.settings.degrade
        base = initial_deployment(s.kafka.group_id, route.name, d.fallback, d.fallback_backend or route.settings.model.backend,
                                  route.settings.model.device)
        dep = replace(base, id=f"{route.name}@degraded-{base.primary.sha256[:12]}", kind="degraded",
                      reason="pressure fallback ([degrade])")
        pool = ScoringPool(replace(self._scorer_config(route.settings, dep), degraded=True),
                           processes=s.inference.processes, threads=s.inference.threads,
                           log_level=s.logging.level, log_format=s.logging.format)
        route.fallback = (dep, pool)
        pool.start()

    def _judge_pressure(self, route: Route, now: float) -> None:
        """Degrade after `after_s` of pressure; recover after `recover_after_s` without (hysteresis)."""
        d = route.settings.degrade
        route.rates.append((now, route.consumed, route.emitted))
        (t0, c0, e0), (t1, c1, e1) = route.rates[0], route.rates[-1]
        in_rate = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
        out_rate = (e1 - e0) / (t1 - t0) if t1 > t0 else 0.0
        recent = [p for t, p in route.recent_p99 if now - t <= PRESSURE_WINDOW_S]
        p99_ms = max(recent) * 1000.0 if recent else 0.0
        # The route's own lag: another route's backlog is no reason to degrade this one.
        lag = sum(self._lag_by_topic.get(t, 0) for t in route.settings.input_topics)
        pressure = bool((d.max_lag and lag > d.max_lag) or (d.max_p99_ms and p99_ms > d.max_p99_ms))
        if route.saved is None:
            route.calm_since = None
            if not pressure:
                route.pressure_since = None
                return
            route.pressure_since = route.pressure_since or now
            if now - route.pressure_since < d.after_s:
                return
            dep, pool = route.fallback
            route.capacity = out_rate  # saturated for after_s: what it emits is what it can do
            route.saved = (route.deployment, route.pool, route.specs)
            route.deployment, route.pool, route.specs = dep, pool, self._specs(dep)
            route.switched_at = now
            self.metrics.degraded.labels(route.name).set(1)
            self.metrics.deployment_events.labels(route.name, "degraded").inc()
            log.warning("route degraded to its fallback", extra={
                "route": route.name, "fallback": f"{dep.primary.name} {dep.primary.version}", "p99_ms": round(p99_ms, 1),
                "lag": lag, "pressure_for_s": round(now - route.pressure_since, 2),
                "primary_capacity_eps": round(route.capacity, 1), "input_eps": round(in_rate, 1)})
            return
        if pressure or in_rate > RECOVER_LOAD_FRACTION * route.capacity:
            route.calm_since = None
            return
        route.calm_since = route.calm_since or now
        if now - route.calm_since < d.recover_after_s:
            return
        route.deployment, route.pool, route.specs = route.saved
        route.saved = None
        route.pressure_since = None
        route.switched_at = now
        self.metrics.degraded.labels(route.name).set(0)
        self.metrics.deployment_events.labels(route.name, "recovered").inc()
        log.info("route recovered from its fallback", extra={"route": route.name, "deployment": route.deployment.id,
                                                             "calm_for_s": round(now - route.calm_since, 2),
                                                             "input_eps": round(in_rate, 1),
                                                             "primary_capacity_eps": round(route.capacity, 1)})

    def _switch(self, route: Route, dep: Deployment, pool: ScoringPool) -> None:
        """New batches of the route go to ``pool`` from now on; the old pool retires when unused."""
        if route.saved is not None:
            # Degraded: the new deployment takes the place of the one the fallback stands in for.
            self._retiring.append(route.saved[1])
            route.saved = (dep, pool, self._specs(dep))
            log.info("deployment loaded while degraded; it serves once the pressure has passed",
                     extra={"route": route.name, "deployment": dep.id})
            return
        old_dep, old_pool = route.deployment, route.pool
        route.deployment, route.pool, route.specs = dep, pool, self._specs(dep)
        route.switched_at = time.monotonic()
        if route.guard is not None:
            route.guard.reset()
        self._retiring.append(old_pool)
        self._publish_deployment_metrics(route, old_dep)
        self.metrics.deployment_events.labels(route.name, "loaded").inc()
        log.info("deployment loaded; new batches use it", extra={
            "route": route.name, "deployment": dep.id, "kind": dep.kind, "previous": old_dep.id,
            "primary": f"{dep.primary.name} {dep.primary.version}",
            "canary": None if dep.canary is None else f"{dep.canary.name} {dep.canary.version} x{dep.fraction:g}",
            "shadow": [f"{m.name} {m.version}" for m in dep.shadow]})

    def _publish_deployment_metrics(self, route: Route, old: Deployment | None) -> None:
        info = self.metrics.deployment_info
        if old is not None:
            for role, ref in old.models():
                try:
                    info.remove(route.name, role, old.id, ref.name, ref.version, ref.sha256[:12])
                except KeyError:
                    pass
        for role, ref in route.deployment.models():
            info.labels(route.name, role, route.deployment.id, ref.name, ref.version, ref.sha256[:12]).set(1)

    def _lifecycle(self, now: float) -> None:
        """New deployments to load, loaded ones to switch to, guard verdicts, old pools to free."""
        follower = self._follower
        if follower is not None and follower.pending:
            for name, dep in follower.take().items():
                route = self.routes.get(name)
                if route is None or route.loader is not None and route.loader.deployment.id == dep.id:
                    continue
                if route.loader is not None:
                    # Superseded while loading (by any later record, even one naming what runs
                    # now): the latest record is the deployment in force, and the pool being
                    # built (scoring processes) would otherwise be switched to, or leaked.
                    log.info("a newer control record replaces the deployment loading", extra={
                        "route": name, "deployment": dep.id, "abandoned": route.loader.deployment.id})
                    route.loader.abandon()
                    route.loader = None
                # (degraded: the deployment in force is the one the fallback stands in for)
                running = route.saved[0] if route.saved is not None else route.deployment
                if dep.id == running.id or dep.id in route.refused:
                    continue
                log.info("loading a new deployment in the background", extra={"route": name, "deployment": dep.id})
                route.loader = DeploymentLoader(dep, lambda d, rs=route.settings: self._build_deployment(rs, d))
        for route in self.routes.values():
            loader = route.loader
            if loader is None or not loader.done:
                continue
            route.loader = None
            if loader.error is not None:
                self._refuse(route, loader.deployment, loader.error)
            else:
                self._switch(route, loader.deployment, loader.pool)
        if now - self._lifecycle_at < LIFECYCLE_TICK_S:
            return
        self._lifecycle_at = now
        if follower is not None:
            healthy = follower.alive and follower.error is None
            self.metrics.control_follower_ok.set(1 if healthy else 0)
        for route in self.routes.values():
            if route.fallback is not None:
                self._judge_pressure(route, now)
            dep = route.deployment
            if route.guard is None or dep.canary is None or route.guard_tripped == dep.id:
                continue
            why = route.guard.verdict(time.monotonic())
            if why:
                self._guard_rollback(route, why)
        if self._retiring:
            in_use = {id(b.future._pool) for b in self._inflight if b.future is not None}
            for pool in [p for p in self._retiring if id(p) not in in_use]:
                self._retiring.remove(pool)
                threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel": True},
                                 name="retire-scoring-pool", daemon=True).start()

    def _guard_rollback(self, route: Route, why: str) -> None:
        """The canary broke a limit: write the rollback (every replica follows it) and say why."""
        dep = route.deployment
        if route.loader is not None or (self._follower is not None and self._follower.pending):
            # A newer deployment is on its way: the control topic keeps the last record written,
            # so a rollback written now could overwrite it. Judge again once it is settled.
            return
        route.guard_tripped = dep.id
        rollback = dep.without_canary(reason=f"canary guard: {why}", requested_by={
            "replica": self.settings.kafka.replica_id, "tool": "sluice canary guard"})
        # The same id on every replica that trips for this deployment: one switch, not one per replica.
        rollback = replace(rollback, id=f"{dep.id}~guard")
        log.warning("canary guard: rolling the canary back", extra={"route": route.name, "deployment": dep.id,
                                                                   "reason": why, "rollback": rollback.id})
        self.metrics.deployment_events.labels(route.name, "guard_rollback").inc()
        self._add_record(self.settings.topics.control, rollback.key, rollback.encode())
        self._add_record(self.settings.topics.audit, rollback.key, audit_record(
            "guard_rollback", dep, replica=self.settings.kafka.replica_id, worker=self.worker_lineage,
            reason=why, extra={"rollback": rollback.id}))

    def _drift_for(self, spec: ModelSpec) -> DriftAccumulator:
        acc = self._drift.get((spec.name, spec.version))
        if acc is None:
            acc = self._drift[(spec.name, spec.version)] = DriftAccumulator(
                spec, self.settings.kafka.replica_id, recent_s=self.settings.drift.recent_s)
        return acc

    def _drift_records(self) -> list[tuple[str, bytes, bytes]]:
        out = []
        for (name, _), acc in self._drift.items():
            delta = acc.take_delta()
            if delta is not None:
                out.append((self.settings.topics.drift, name.encode(), delta))
        return out

    def _renew_producer(self) -> None:
        """Continue under a fresh producer epoch after a commit or abort of unknown outcome.

        The new producer's init_transactions fences the old one and settles its transaction on
        the coordinator (completes a commit that was written, aborts anything else), so the
        committed offsets read afterwards are the truth to rewind to. The old client is let go
        without waiting on it: it may still sit in the call that timed out.
        """
        old = self.producer
        self.producer = TransactionalProducer(kafka_settings.producer_config(self.settings))
        self.producer.stop_by = self._stop_deadline
        threading.Thread(target=old.close, name="close-old-producer", daemon=True).start()
        try:
            self.producer.init()
        except IndefiniteOutcome:
            if self._stop_requested:
                return  # asked to stop meanwhile: _shutdown sees the producer unusable and leaves
            raise
        except FatalProducerError as exc:
            raise StopWorker(EXIT_TEMPFAIL, f"cannot start a new producer after a transaction of unknown "
                             f"outcome: {exc}") from exc
        self.metrics.producer_renewals.inc()
        log.info("producer renewed under a new epoch")

    def _new_consumer(self) -> Consumer:
        """The group consumer, subscribed to the input topics."""
        s = self.settings
        conf = kafka_settings.consumer_config(s)
        conf["stats_cb"] = self._on_stats
        conf["error_cb"] = self._on_client_error
        consumer = Consumer(conf)
        consumer.subscribe(
            list(s.kafka.input_topics), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        return consumer

    def _replace_fenced_consumer(self, err: KafkaError) -> None:
        """The consumer was fenced as a static member but the producer was not: abort the open
        transaction and rejoin with a new consumer (see CONSUMER_REFENCE_LIMIT)."""
        now = time.monotonic()
        self._consumer_fences = [t for t in self._consumer_fences if now - t < CONSUMER_REFENCE_WINDOW_S]
        self._consumer_fences.append(now)
        if len(self._consumer_fences) > CONSUMER_REFENCE_LIMIT:
            raise StopWorker(EXIT_FENCED, f"consumer fenced {len(self._consumer_fences)} times in "
                             f"{CONSUMER_REFENCE_WINDOW_S:.0f}s; another process may run with replica id "
                             f"{self.settings.kafka.replica_id!r}: {err.str()}")
        log.warning("consumer fenced as a static member while the producer is not; rejoining with a new "
                    "consumer", extra={"error": err.str()})
        lost = set(self._assigned)
        self._abort_and_rewind("consumer_fenced", partitions=set())
        self._applied.clear()
        self._forget_lag(lost)
        self._assigned.clear()
        self.metrics.assigned_partitions.set(0)
        if lost:
            self.metrics.rebalances.labels("lost").inc(len(lost))
        old, self.consumer = self.consumer, None
        try:
            old.close()
        except (KafkaException, RuntimeError) as exc:  # fatal already: closing only frees it
            log.info("closing the fenced consumer failed", extra={"error": str(exc)})
        self.consumer = self._new_consumer()

    # ------------------------------------------------------------- main loop

    def request_stop(self) -> None:
        """First call: drain and commit within ``shutdown_timeout_ms`` from now. Second call:
        abort at once. (Called from a signal handler: it only sets flags and deadlines.)"""
        if self._stop_requested:
            self._force_stop = True
            self._stop_deadline = time.monotonic()
        else:
            self._stop_deadline = time.monotonic() + self.settings.transactions.shutdown_timeout_ms / 1000.0
        self._stop_requested = True
        if self._running:
            # A commit, abort or renewal under way when the signal came waits no longer than
            # this (never longer than a deadline it had already: e.g. the abort in _close).
            self._limit_producer(self._stop_deadline)

    def _limit_producer(self, deadline: float | None) -> None:
        if deadline is not None:
            current = self.producer.stop_by
            self.producer.stop_by = deadline if current is None else min(current, deadline)

    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        # From here a stop deadline also bounds the transactional calls. (Not during start(): an
        # init_transactions given up there would be a start-up failure, not a stop.)
        self._running = True
        self._limit_producer(self._stop_deadline)
        try:
            self._loop()
            return self._shutdown()
        except StopWorker as stop:
            log.error("worker stopping", extra={"reason": str(stop), "exit_code": stop.exit_code})
            self._close(abort=True)
            return stop.exit_code
        except ConfigError as exc:  # e.g. NotAuthorized: a missing ACL fails every retry alike
            log.error("worker stopping", extra={"reason": str(exc), "exit_code": int(ExitCode.CONFIG)})
            self.metrics.set_ready(False, "configuration")
            self._close(abort=True)
            return ExitCode.CONFIG
        except TransactionStuck as exc:
            # The stuck call cannot be cancelled and closing the client could wait on it too:
            # leave at once. Nothing committed is lost; the broker aborts the open transaction
            # (or the restarted replica's init does) and the restart resumes from the commits.
            log.error("transactional call stuck; exiting for the supervisor to restart",
                      extra={"error": str(exc), "exit_code": int(EXIT_TEMPFAIL)})
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_TEMPFAIL)
        except FatalProducerError as exc:
            if self._stop_requested and self.producer.outcome_unknown:
                # Not fenced: a call given up at the stop deadline left the producer unusable,
                # and something still in flight then touched it. Leave as a stop that could not
                # commit; nothing committed is lost.
                log.warning("shutdown with a producer given up: leaving without a commit", extra={"error": str(exc)})
                self._close(abort=True)
                return ExitCode.FORCED_STOP if self._force_stop else ExitCode.FAILURE
            log.error("fatal producer error; exiting for the supervisor to restart", extra={"error": str(exc)})
            self.metrics.set_ready(False, "producer fenced or fatal error")
            self._close(abort=False)
            return EXIT_FENCED
        except Exception:  # noqa: BLE001 - a bug or an unexpected client state: abort, say so, exit
            log.exception("unexpected error; aborting the open transaction")
            self.metrics.set_ready(False, "unexpected error")
            self._close(abort=True)
            return EXIT_SOFTWARE

    def _loop(self) -> None:
        s = self.settings
        commit_interval = s.transactions.commit_interval_ms / 1000.0
        max_inflight = s.batching.max_inflight_batches
        resume_at = max(0, int(max_inflight * RESUME_FRACTION))
        batcher = self.batcher
        while not self._stop_requested:
            self.metrics.heartbeat()
            self._emit_completed(block_s=0.0)
            now = time.monotonic()
            self._lifecycle(now)
            started = self.txn.started_at
            if started is not None and now - started >= commit_interval:
                self._commit("interval")
                continue  # (a stop requested while it ran is seen before anything else is done)

            if len(self._inflight) >= max_inflight:
                if self._full_since is None:
                    self._full_since = now
                elif not self._paused and now - self._full_since >= BACKPRESSURE_PAUSE_AFTER_S:
                    self._pause()
                if self._paused:
                    # Keep polling (group membership, max.poll.interval) while waiting for inference.
                    self._consume(0, 0.0)
                self._emit_completed(block_s=BACKPRESSURE_WAIT_S)
                continue
            self._full_since = None
            if self._paused and len(self._inflight) <= resume_at:
                self._resume()

            # Wait no longer than the open batch's deadline or the next commit.
            wait = MAX_POLL_WAIT_S
            left = batcher.time_left(now)
            if left is not None:
                wait = min(wait, left)
            if self.txn.started_at is not None:
                wait = min(wait, max(0.0, self.txn.started_at + commit_interval - now))
            if self._inflight:
                wait = min(wait, INFLIGHT_POLL_WAIT_S)
                if self._writing():
                    wait = min(wait, WRITING_POLL_WAIT_S)
            msgs = self._consume(batcher.room, wait)
            now = time.monotonic()
            if not msgs and not self._inflight and not len(batcher) and self.txn.started_at is not None:
                # Idle: a whole poll brought nothing and everything consumed is emitted, so
                # commit now rather than make readers wait for the interval.
                self._commit("idle")
                continue
            for full in batcher.add(msgs, now):
                self._submit(full)
            if batcher.due(now, self._idle()):
                self._submit(batcher.take())

    def _writing(self) -> bool:
        if self._single_route is not None:
            return self._single_route.pool.writing
        return any(r.pool.writing for r in self.routes.values())

    def _idle(self) -> bool:
        if self._single_route is not None:
            return self._single_route.pool.idle
        return any(r.pool.idle for r in self.routes.values())

    def _consume(self, n: int, timeout: float) -> list[Message]:
        self._rewound.clear()
        epoch = self._epoch
        if n <= 0:
            # consume(0) is not allowed; poll serves callbacks (rebalance, stats) and may
            # return one message, which must not be lost.
            m = self.consumer.poll(timeout)
            msgs = [m] if m is not None else []
        else:
            # consume(n, timeout) would block until n messages arrive, so every batch would wait
            # to fill. Take what is queued now; if nothing, block only until the first message
            # arrives and take what came with it: batches grow with load by themselves.
            msgs = self.consumer.consume(n, 0)
            if not msgs and timeout > 0:
                first = self.consumer.poll(timeout)
                if first is not None:
                    msgs = [first]
                    if n > 1:
                        msgs += self.consumer.consume(n - 1, 0)
        if not msgs:
            return msgs
        # Rebalance callbacks run inside consume()/poll(): a message returned by this call may
        # belong to a partition revoked or rewound meanwhile. Batching it would give its offset
        # a second output (the new owner, or the refetch after the rewind, scores it again).
        good = [m for m in msgs if m.error() is None]
        if len(good) != len(msgs):
            self._consumer_errors([m for m in msgs if m.error() is not None])
        if self._epoch != epoch:
            assigned, rewound = self._assigned, self._rewound
            good = [m for m in good if (tp := (m.topic(), m.partition())) in assigned and tp not in rewound]
        if good:
            if self.stats.first_fetch_at is None:
                self.stats.first_fetch_at = time.monotonic()
            self.stats.consumed += len(good)
            if len(self.settings.kafka.input_topics) == 1:
                self.metrics.consumed.labels(good[0].topic()).inc(len(good))
            else:
                for topic, count in Counter(m.topic() for m in good).items():
                    self.metrics.consumed.labels(topic).inc(count)
        if n <= 0 and good:
            # A message polled during backpressure joins the open batch.
            for full in self.batcher.add(good, time.monotonic()):
                self._submit(full)
            return []
        return good

    def _consumer_errors(self, errors: list[Message]) -> None:
        for m in errors:
            err = m.error()
            if err.fatal() or err.code() == KafkaError._FATAL:
                # e.g. FENCED_INSTANCE_ID. librdkafka delivers it as an error event whose code is
                # _FATAL but whose fatal() is False, naming the cause only in the text.
                if _static_member_fenced(err) and self.producer.failed is None:
                    self._replace_fenced_consumer(err)
                    return
                raise StopWorker(EXIT_FENCED, f"fatal consumer error: {err.str()}")
            if is_authorization_error(err):
                raise StopWorker(ExitCode.CONFIG, f"consumer not authorized: {err.str()} (see the README, section "
                                 "\"Secured clusters\", for the ACLs a replica needs)")
            if err.code() == KafkaError.INVALID_SESSION_TIMEOUT:
                # The group would never form: retrying with the same setting cannot help.
                raise StopWorker(ExitCode.CONFIG, f"the broker refuses kafka.session_timeout_ms="
                                 f"{self.settings.kafka.session_timeout_ms}: it must lie within the broker's "
                                 "group.min.session.timeout.ms and group.max.session.timeout.ms "
                                 "(Kafka's defaults: 6000 and 1800000)")
            log.warning("consumer error", extra={"error": err.str(), "code": err.name()})

    # -------------------------------------------------------- batch lifecycle

    def _submit(self, msgs: list[Message]) -> None:
        """Send a batch to its route's pool (split by route when a worker serves several)."""
        route = self._single_route
        if route is not None:
            self._submit_to(route, msgs)
            return
        by_route: dict[str, list[Message]] = {}
        for m in msgs:
            by_route.setdefault(self._route_of[m.topic()].name, []).append(m)
        for name, part in by_route.items():
            self._submit_to(self.routes[name], part)

    def _submit_to(self, route: Route, msgs: list[Message]) -> None:
        partitions = [m.partition() for m in msgs]
        offsets = [m.offset() for m in msgs]
        if len(route.settings.input_topics) == 1:  # the common case: the topic is sent once, not per message
            topics = route.settings.input_topics[0]
            # Offsets rise within a partition, so the last one seen per partition is its maximum.
            last = {(topics, p): o + 1 for p, o in dict(zip(partitions, offsets)).items()}
        else:
            topics = [m.topic() for m in msgs]
            last = {tp: o + 1 for tp, o in dict(zip(zip(topics, partitions), offsets)).items()}
        batch = Batch(msgs, [m.key() for m in msgs], last, route=route, deployment=route.deployment)
        route.consumed += len(msgs)
        batch.future = route.pool.submit([m.value() for m in msgs], topics, partitions, offsets)
        self._inflight.append(batch)
        self.metrics.inflight_batches.set(len(self._inflight))
        self.metrics.batch_size.observe(len(msgs))
        self.stats.batches += 1
        self.stats.batch_events += len(msgs)

    def _emit_completed(self, block_s: float) -> None:
        """Emit finished batches from the head of the queue, in submission order."""
        inflight = self._inflight
        while inflight:
            fut = inflight[0].future
            pool = fut._pool
            try:
                # Bounded: a backend that holds a batch past the pool's scoring deadline
                # (SCORING_DEADLINE_S) raises ScoringTimeout; the pool is broken then.
                if not pool.wait(fut, block_s):
                    return
                block_s = 0.0
                batch = inflight.popleft()
                pool.collected()
                result = fut.result()
            except ScoringTimeout as exc:
                raise StopWorker(EXIT_SOFTWARE, f"scoring hung ({exc}); see its log above") from exc
            except BrokenExecutor as exc:
                raise StopWorker(EXIT_SOFTWARE, f"a scoring process died ({exc}); see its log above") from exc
            try:
                if not self._emit(batch, result):
                    return  # the transaction before it failed to commit: everything was rewound
            except AbortableError as exc:
                # The transaction cannot go on (librdkafka refused a record): abort it and redo
                # everything since the last commit, this batch included.
                log.warning("produce failed; aborting and rewinding", extra={"error": str(exc)})
                self._abort_and_rewind("produce_failed")
                return
        self.metrics.inflight_batches.set(len(inflight))

    def _emit(self, batch: Batch, result: ScoredBatch) -> bool:
        """Produce one batch's outputs into the open transaction (begun here if need be).

        False when the batch was not emitted: its deployment differs from the open
        transaction's for the route, the commit that closes that transaction failed, and
        everything (this batch included) was aborted and rewound.
        """
        route, dep = batch.route, batch.deployment
        txn = self.txn
        if txn.open and txn.deployments.get(route.name, dep.id) != dep.id:
            # A deployment switch: its first output starts a new transaction.
            budget = COMMIT_TIMEOUT_S if self._drain_deadline is None else \
                max(1.0, self._drain_deadline - time.monotonic())  # inside a revoke or a shutdown: its budget
            if not self._commit("switch", timeout=budget):
                return False
            txn = self.txn
        producer = self.producer
        if not txn.open:
            txn.begin()
        txn.deployments[route.name] = dep.id
        if route.switched_at is not None and dep is route.deployment:
            self.metrics.switch_seconds.labels(route.name).set(time.monotonic() - route.switched_at)
            route.switched_at = None
        applied = self._applied
        fresh = [tp for tp in batch.next_offsets if applied.get(tp) != dep.id and txn.applied.get(tp) != dep.id]
        if fresh:
            self._audit_applied(batch, fresh)
        topics_out = self.settings.topics
        msgs = batch.msgs
        self.metrics.queue_wait.observe(result.queue_wait_s)
        self.metrics.route_inference.labels(route.name).observe(result.infer_s)
        if result.drift is not None:  # (None when drift is off)
            self._drift_for(self._spec_of(route, dep, "primary")).add_counts(result.drift)
        if result.canary_drift is not None:
            self._drift_for(self._spec_of(route, dep, "canary")).add_counts(result.canary_drift)
        if route.guard is not None and dep.canary is not None and dep is route.deployment:
            route.guard.add(result.role_stats, time.monotonic())

        values = result.records
        n = len(values)
        if n:
            keys = batch.keys
            if n != len(msgs):  # rejects: pick the keys of the scored rows
                keys = [keys[i] for i in result.positions.tolist()]
            produce = producer.produce_call
            scores_topic = route.settings.scores
            for value, key in zip(values, keys):
                try:
                    produce(scores_topic, value, key)
                except (BufferError, KafkaException):  # queue full, fenced, failed transaction
                    producer.produce(scores_topic, value, key)
            # End-to-end latency from the event's own timestamp (DESIGN: event timestamp -> emit).
            latency = time.time() - result.event_ts
            latency = latency[np.isfinite(latency)]
            self.metrics.e2e_latency.observe_many(latency)
            self.stats.recent_latency.append(latency)
            if route.fallback is not None and len(latency):
                route.recent_p99.append((time.monotonic(), float(np.quantile(latency, 0.99))))
            if self.stats.latency_log is not None:
                self.stats.latency_log.append((time.monotonic(), latency))
            self.stats.scored += n
            for role, st in result.role_stats.items():
                if role != "shadow":
                    self.metrics.scored.labels(route.specs["primary"].name if role == "primary" else
                                               (dep.canary.name if dep.canary else role)).inc(st[0])
                    self.metrics.route_scored.labels(route.name, role).inc(st[0])
        if result.shadow:
            shadow_topic = topics_out.shadow
            for i, (records, positions) in enumerate(result.shadow):
                for value, pos in zip(records, positions.tolist()):
                    producer.produce(shadow_topic, value, batch.keys[pos])
                self.metrics.route_scored.labels(route.name, "shadow").inc(len(records))
                both, agree = result.shadow_agreement[i]
                labels = (route.name, dep.shadow[i].name, dep.shadow[i].version)
                self.metrics.shadow_compared.labels(*labels).inc(both)
                self.metrics.shadow_agreed.labels(*labels).inc(agree)

        max_dlq = topics_out.dlq_max_value_bytes
        dlq_topic = route.settings.dlq
        for rej in result.rejects:
            m = msgs[rej.position]
            key = m.key()
            value, headers = dead_letter(
                m.value(), m.headers(), rej.reason, rej.detail, m.topic(), m.partition(), m.offset(),
                self.worker_name, max_dlq - (len(key) if key else 0),
            )
            producer.produce(dlq_topic, value, key, headers=headers)
            self.metrics.dead_lettered.labels(rej.reason).inc()
        self.stats.dead_letters += len(result.rejects)
        txn.take(batch.next_offsets)
        if route.saved is None or dep is not route.deployment:
            route.emitted += len(msgs)  # the route's own models (the fallback's output is no capacity)
        return True

    @staticmethod
    def _spec_of(route: Route, dep: Deployment, role: str) -> ModelSpec:
        """A role's model spec for a batch (a batch scored before a switch has the old deployment's)."""
        if dep is route.deployment:
            return route.specs[role]
        return ModelSpec.load((dep.primary if role == "primary" else dep.canary).path)

    def _audit_applied(self, batch: Batch, partitions: list[tuple[str, int]]) -> None:
        """The first outputs of a deployment on these partitions: say so, in the same transaction."""
        dep, want = batch.deployment, set(partitions)
        first: dict[tuple[str, int], int] = {}
        for m in batch.msgs:
            tp = (m.topic(), m.partition())
            if tp in want and tp not in first:
                first[tp] = m.offset()
                if len(first) == len(want):
                    break
        previous = {self._applied.get(tp) for tp in partitions} - {None}
        trigger = "switch" if previous else "assigned"
        self.txn.add_record(self.settings.topics.audit, dep.key, audit_record(
            "applied", dep, replica=self.settings.kafka.replica_id, worker=self.worker_lineage,
            offsets=[(t, p, o) for (t, p), o in sorted(first.items())],
            extra={"trigger": trigger, "previous": sorted(previous)}), redo=False)
        for tp in partitions:
            self.txn.applied[tp] = dep.id
        if trigger == "switch":
            self.metrics.deployment_events.labels(batch.route.name, "applied").inc()

    # ---------------------------------------------------------- transactions

    def _commit(self, why: str, timeout: float = COMMIT_TIMEOUT_S) -> bool:
        """Commit the open transaction; False if it had to be aborted (and was rewound)."""
        txn = self.txn
        if not txn.open:
            return True
        start = time.perf_counter()
        try:
            # (a FatalProducerError, e.g. fenced, propagates: the process exits 3)
            txn.commit(self.consumer.consumer_group_metadata(), self._drift_records, timeout)
        except AbortableError as exc:
            log.warning("transaction failed; aborting and rewinding", extra={"error": str(exc), "during": why})
            self._abort_and_rewind("commit_failed")
            return False
        except IndefiniteOutcome as exc:
            log.warning("commit outcome unknown; renewing the producer and rewinding",
                        extra={"error": str(exc), "during": why})
            self._abort_and_rewind("commit_failed")
            return False
        self.metrics.commit_seconds.observe(time.perf_counter() - start)
        self.metrics.txn_committed.inc()
        self._applied.update(txn.applied)
        self.txn = Transaction(self.producer)
        self.stats.commits += 1
        self.stats.last_commit_at = time.monotonic()
        if self._drift and self.stats.last_commit_at - self._drift_gauges_at >= DRIFT_GAUGE_INTERVAL_S:
            self._drift_gauges_at = self.stats.last_commit_at
            worst = math.nan
            for (name, _), acc in self._drift.items():
                psi = acc.recent_psi()
                for feature, value in psi.items():
                    self.metrics.drift_psi.labels(name, feature).set(value)
                worst = max(psi.values(), default=worst) if math.isnan(worst) else max([worst, *psi.values()])
            self.stats.max_psi = worst
        return True

    def _abort_and_rewind(self, reason: str, partitions: set[tuple[str, int]] | None = None) -> None:
        """Step 4: abort, drop in-flight work, rewind to the last committed offsets."""
        self._drop_inflight()
        self.batcher.take()
        carry = self.txn.carry_over()
        if self.producer.failed is None:
            try:
                self.producer.abort()
            except IndefiniteOutcome as exc:
                log.warning("abort outcome unknown; renewing the producer", extra={"error": str(exc)})
        if self.producer.outcome_unknown and not self._stop_requested:
            # (after a fatal error, e.g. fenced, no renewal: a new epoch would fence the
            # replica that legitimately took over; at shutdown the process is leaving anyway)
            self._renew_producer()
        for acc in self._drift.values():
            acc.reset()
        # Audit and control records of the aborted transaction go into the next one.
        self.txn = Transaction(self.producer, carry)
        self.stats.aborts += 1
        self.metrics.txn_aborted.labels(reason).inc()
        targets = partitions if partitions is not None else set(self._assigned)
        self._rewound |= targets
        self._epoch += 1
        if self._stop_requested:
            self._aborted_at_stop = True  # what it held is redone by the next owner; exit 1, not 0
        if not targets or self._stop_requested:
            # Stopping: nothing more is consumed, so there is no position to restore (and reading
            # the committed offsets could wait COMMITTED_TIMEOUT_S on a broker that is down).
            return
        try:
            not_held = rewind_to_committed(self.consumer, targets, COMMITTED_TIMEOUT_S)
        except RewindFailed as exc:
            # Restart instead, which resumes from the committed offsets.
            raise StopWorker(EXIT_TEMPFAIL, str(exc)) from exc
        if not_held:
            # Fenced as a static member or revoked meanwhile: the fatal error or the revoke
            # reaches the next poll, which deals with it.
            log.info("partitions no longer held were not rewound; their next owner resumes from "
                     "the committed offsets", extra={"partitions": [f"{t}[{p}]" for t, p in not_held]})
        if self._paused:
            self._resume()

    def _drop_inflight(self) -> None:
        """Cancel every in-flight batch at once: no waiting for inference (a hung backend
        cannot hold up an abort or a revoke); answers still coming are thrown away."""
        for route in self.routes.values():
            route.pool.drop_all()
            for other in (route.fallback, route.saved):
                if other is not None and other[1] is not route.pool:
                    other[1].drop_all()
        for pool in self._retiring:
            pool.drop_all()
        self._inflight.clear()
        self.metrics.inflight_batches.set(0)

    def _drain(self, deadline: float) -> bool:
        """Emit every in-flight batch; False if the deadline passed first."""
        self._drain_deadline = deadline
        try:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0 or self._force_stop:
                    return False
                self._emit_completed(block_s=min(left, 0.1))
            return True
        finally:
            self._drain_deadline = None

    # ----------------------------------------------------------- rebalancing

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._epoch += 1
        consumer.incremental_assign(partitions)
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        if self._paused and partitions:
            consumer.pause(partitions)
            self.metrics.paused_partitions.set(len(self._assigned))
        self.metrics.assigned_partitions.set(len(self._assigned))
        self.metrics.rebalances.labels("assigned").inc(len(partitions))
        log.info("partitions assigned", extra={"partitions": _names(partitions), "total": len(self._assigned)})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Step 6: finish in-flight work, commit, return, within the revoke budget."""
        self._epoch += 1
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        deadline = time.monotonic() + self.settings.transactions.revoke_timeout_ms / 1000.0
        dropped = self.batcher.drop(lambda m: (m.topic(), m.partition()) in revoked)
        if self.producer.failed is not None or self._closing:
            # Closing (the shutdown committed or aborted already), or after a fatal error:
            # nothing more can be committed; the broker aborts an open transaction and the
            # partitions' next owner resumes from the last commit.
            pass
        elif self._drain(deadline):
            # The commit shares the revoke budget (max.poll.interval.ms is at stake).
            self._commit("revoke", timeout=max(1.0, deadline - time.monotonic()))
        else:
            log.warning("revoke budget exceeded; aborting the open transaction", extra={"dropped": dropped})
            self._abort_and_rewind("revoke_timeout", partitions=self._assigned - revoked)
        self.txn.forget(revoked)
        for key in revoked:
            self._applied.pop(key, None)  # a later owner of it audits its own outputs
        self._forget_lag(revoked)
        self._assigned -= revoked
        consumer.incremental_unassign(partitions)
        self.metrics.assigned_partitions.set(len(self._assigned))
        self.metrics.rebalances.labels("revoked").inc(len(partitions))
        log.info("partitions revoked", extra={"partitions": _names(partitions), "total": len(self._assigned)})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions lost (session expired): their offsets can no longer be committed by us."""
        self._epoch += 1
        lost = {(tp.topic, tp.partition) for tp in partitions}
        if not self._closing:  # (closing: the shutdown aborted or committed already)
            log.warning("partitions lost; aborting the open transaction", extra={"partitions": _names(partitions)})
            self._abort_and_rewind("partitions_lost", partitions=self._assigned - lost)
        for key in lost:
            self._applied.pop(key, None)
        self._forget_lag(lost)
        self._assigned -= lost
        consumer.incremental_unassign(partitions)
        self.metrics.assigned_partitions.set(len(self._assigned))
        self.metrics.rebalances.labels("lost").inc(len(partitions))

    def _forget_lag(self, partitions: set[tuple[str, int]]) -> None:
        """Drop lag series of partitions this replica no longer owns (the new owner reports them)."""
        for topic, partition in partitions:
            try:
                self.metrics.consumer_lag.remove(topic, str(partition))
            except KeyError:
                pass

    def _pause(self) -> None:
        tps = [TopicPartition(t, p) for t, p in self._assigned]
        if tps:
            self.consumer.pause(tps)
        self._paused = True
        self.metrics.paused_partitions.set(len(tps))

    def _resume(self) -> None:
        tps = [TopicPartition(t, p) for t, p in self._assigned]
        if tps:
            self.consumer.resume(tps)
        self._paused = False
        self.metrics.paused_partitions.set(0)

    # -------------------------------------------------------------- shutdown

    def _shutdown(self) -> int:
        """Step 7: stop consuming, drain, commit, close; abort on a second signal or the deadline."""
        self.metrics.set_ready(False, "shutting down")
        # From the stop request, not from here: a commit or renewal under way when the signal
        # came spent part of the budget already.
        deadline = self._stop_deadline or time.monotonic() + self.settings.transactions.shutdown_timeout_ms / 1000.0
        if self._assigned:
            self._pause()
        if self.producer.failed is not None:
            if not self.producer.outcome_unknown:  # fenced or fatal: exit 3 (run() says so)
                raise FatalProducerError(f"producer unusable after a fatal error: {self.producer.failed}")
            # A commit, abort or renewal was given up at the stop deadline: nothing more can be
            # committed; the partitions' next owner redoes what was not.
            log.warning("shutdown with a producer given up: leaving without a commit",
                        extra={"error": self.producer.failed})
            self._aborted_at_stop = True
        elif len(self.batcher):
            self._submit(self.batcher.take())
        if not self._force_stop and self.producer.failed is None and self._drain(deadline):
            try:
                # Drained in time: the commit gets at least a second even if that was close.
                self.producer.stop_by = max(deadline, time.monotonic() + 1.0)
                committed = self._commit("shutdown", timeout=max(1.0, deadline - time.monotonic()))
            except FatalProducerError as exc:
                log.error("fatal error while committing at shutdown", extra={"error": str(exc)})
                self._close(abort=False)
                return EXIT_FENCED
            if committed and not self._aborted_at_stop:
                log.info("drained and committed; closing", extra=self._summary())
                self._close(abort=False)
                return ExitCode.OK
        log.warning("shutdown forced, deadline passed or last commit failed; aborting", extra=self._summary())
        self._close(abort=True)
        return ExitCode.FORCED_STOP if self._force_stop else ExitCode.FAILURE

    def _close(self, abort: bool) -> None:
        self._closing = True
        if self.producer is not None and abort:
            try:
                self._drop_inflight()
                if self.producer.in_transaction:
                    self.metrics.txn_aborted.labels("shutdown").inc()
                if self.txn is not None and self.txn.records:
                    log.warning("audit/control records of the aborted transaction are not written",
                                extra={"records": len(self.txn.records)})
                if self.producer.failed is None:
                    self.producer.stop_by = time.monotonic() + CLOSE_ABORT_TIMEOUT_S
                    self.producer.abort(timeout=CLOSE_ABORT_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the broker's timeout / next init aborts it anyway
                log.warning("abort at close failed", extra={"error": str(exc)})
        if self._follower is not None:
            self._follower.stop()
        for route in self.routes.values():
            # Wait for a batch still running (cancelling queued ones) before freeing the
            # backend under it: a GPU backend would crash on freed buffers.
            route.pool.shutdown(wait=True, cancel=True)
            if route.loader is not None:
                route.loader.abandon()
        for pool in self._retiring:
            pool.shutdown(wait=True, cancel=True)
        for route in self.routes.values():
            if route.fallback is not None and route.fallback[1] is not route.pool:
                route.fallback[1].shutdown(wait=True, cancel=True)
            if route.saved is not None:
                route.saved[1].shutdown(wait=True, cancel=True)
        if self.consumer is not None:
            self.metrics.consumer_lag.clear()
            try:
                # Static members keep their partitions through close (no LeaveGroup), so a
                # restart under the same replica id resumes without a rebalance.
                self.consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("consumer close failed", extra={"error": str(exc)})
        if self.producer is not None:
            self.producer.close()

    def _summary(self) -> dict:
        st = self.stats
        return {"consumed": st.consumed, "scored": st.scored, "dead_letters": st.dead_letters,
                "commits": st.commits, "aborts": st.aborts}

    # ------------------------------------------------------------- callbacks

    def _on_stats(self, stats_json: str) -> None:
        try:
            stats = orjson.loads(stats_json)
        except orjson.JSONDecodeError:
            return
        total = 0
        by_topic: dict[str, int] = {}
        for tname, topic in stats.get("topics", {}).items():
            for pid, p in topic.get("partitions", {}).items():
                if pid == "-1" or (tname, int(pid)) not in self._assigned:
                    continue
                # librdkafka's consumer_lag compares with offsets the consumer committed itself,
                # which transactional commits are not: measure from the application position.
                end, pos = p.get("ls_offset", -1), p.get("app_offset", -1)
                if end >= 0 and pos >= 0:
                    lag = max(0, end - pos)
                    self.metrics.consumer_lag.labels(tname, pid).set(lag)
                    total += lag
                    by_topic[tname] = by_topic.get(tname, 0) + lag
        self.stats.lag = total
        self._lag_by_topic = by_topic

    def _on_client_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("fatal client error", extra={"error": err.str()})
        else:
            log.info("client error (librdkafka retries)", extra={"error": err.str(), "code": err.name()})


def _static_member_fenced(err: KafkaError) -> bool:
    """FENCED_INSTANCE_ID, as librdkafka reports it (a _FATAL event that names it in its text)."""
    return err.code() == KafkaError.FENCED_INSTANCE_ID or "same group.instance.id" in err.str()


def _names(tps: list[TopicPartition]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in tps]
