"""Model lifecycle in the worker: following the control topic, loading deployments, the canary guard.

The records are described in :mod:`workers.control`. Here is what a replica does with them:

1. At start, after its scoring pools hold the configured models, it reads the control
   topic to its end (:func:`read_deployments`) and loads the latest deployment of each of
   its routes before it consumes anything.
2. While running, :class:`ControlFollower` (a thread with its own read_committed consumer,
   outside the group) hands every newer deployment to the orchestrator, which loads and
   warms it in a new scoring pool in the background (:class:`DeploymentLoader`): the models
   are loaded, warmed and checked against their manifest's examples there. A deployment
   that fails is refused (an audit record says why) and the old one stays.
3. The orchestrator switches the route to the new pool between batches; the transaction
   boundary is kept by committing the open transaction before the first output of the new
   deployment is produced (see :mod:`workers.pipeline`), and the first outputs on each
   partition carry an ``applied`` audit record in the same transaction.
4. :class:`CanaryGuard` watches the canary against the primary over a window and, past a
   limit, the replica writes the rollback itself (in its transaction), which every replica
   then follows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from workers.config import GuardSettings, RouteSettings, Settings
from workers.control import ControlRecordError, Deployment, control_key
from workers.features import psi
from workers.kafka import settings as kafka_settings

log = logging.getLogger(__name__)

# Reading the control topic to its end at start: a cluster that does not answer within this
# fails the start like any other broker error (exit 75), rather than scoring with a stale model.
CONTROL_READ_TIMEOUT_S = 30.0
# The follower's poll: how late a new deployment is noticed (loading it takes far longer).
FOLLOW_POLL_S = 0.5


def _control_consumer(settings: Settings, tag: str) -> Consumer:
    """A plain read_committed consumer outside the worker's group (assign only, never commits)."""
    conf = kafka_settings.common(settings)
    conf.update({
        # assign() needs no group, but librdkafka wants an id; it is never joined or committed.
        "group.id": f"{settings.kafka.group_id}.control.{tag}.{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        # Only deployments whose writer committed: a guard rollback rides in a worker's transaction.
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    })
    return Consumer(conf)


def _partitions(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    md = consumer.list_topics(topic, timeout=timeout)
    t = md.topics.get(topic)
    if t is None or t.error is not None and t.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
        return []
    if t.error is not None:
        raise KafkaException(t.error)
    return sorted(t.partitions)


def read_deployments(settings: Settings, timeout: float = CONTROL_READ_TIMEOUT_S) -> dict[str, Deployment]:
    """The latest deployment per route of this group on the control topic (read to its end)."""
    return read_control(settings, timeout)[0]


def read_control(settings: Settings, timeout: float = CONTROL_READ_TIMEOUT_S) -> tuple[dict[str, Deployment], dict[int, int]]:
    """:func:`read_deployments`, and per partition the offset where the read ended (where a
    :class:`ControlFollower` goes on, so it never hands out a deployment older than these)."""
    topic, group = settings.topics.control, settings.kafka.group_id
    consumer = _control_consumer(settings, "read")
    latest: dict[str, Deployment] = {}
    starts: dict[int, int] = {}
    try:
        deadline = time.monotonic() + timeout
        parts = _partitions(consumer, topic, timeout)
        ends: dict[int, int] = {}
        for p in parts:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=max(0.1, deadline - time.monotonic()))
            starts[p] = hi
            if hi > lo:
                ends[p] = hi
        if not ends:
            return latest, starts
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        positions = {p: -1 for p in ends}
        while any(positions[p] + 1 < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the control topic {topic!r} was not read to its end within {timeout:.0f}s")
            for m in consumer.consume(500, 0.2):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(m.error())
                positions[m.partition()] = m.offset()
                if m.offset() < ends[m.partition()]:
                    # Beyond the end taken above is the follower's (it starts there): taken here
                    # too, a later record could be applied now and an earlier one handed out after.
                    _take(m, group, latest)
            # Transaction markers and aborted records are never returned: go by the position.
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= 0:
                    positions[tp.partition] = max(positions[tp.partition], tp.offset - 1)
    finally:
        consumer.close()
    return latest, starts


def _take(msg, group: str, latest: dict[str, Deployment]) -> Deployment | None:
    """Decode one control record of this group into ``latest``; bad records are logged and skipped."""
    key = msg.key() or b""
    if not key.startswith(group.encode() + b"/") or msg.value() is None:
        return None
    try:
        dep = Deployment.decode(msg.value())
    except ControlRecordError as exc:
        log.error("unreadable control record skipped", extra={"error": str(exc), "offset": msg.offset(),
                                                               "partition": msg.partition()})
        return None
    if dep.group != group or control_key(dep.group, dep.route) != key:
        log.error("control record under the wrong key skipped", extra={"key": key.decode(errors="replace"),
                                                                         "deployment": dep.id})
        return None
    latest[dep.route] = dep
    return dep


class ControlFollower:
    """A thread reading the control topic from where :func:`read_deployments` left off.

    ``take()`` (orchestrator thread) returns the newest deployment per route seen since the
    last call. The thread only reads; it never touches the worker's clients.
    """

    def __init__(self, settings: Settings, routes: set[str], start: dict[int, int] | None = None):
        """``start``: per control partition, the offset to read from (:func:`read_control`'s);
        partitions not in it are read from the beginning."""
        self.settings = settings
        self.routes = routes
        self._start = dict(start or {})
        self._lock = threading.Lock()
        self._new: dict[str, Deployment] = {}
        self.pending = False  # read without the lock on the hot path: a cheap "anything new?"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-follower", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The thread still follows the topic (it only ends on stop() or an unexpected error)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def take(self) -> dict[str, Deployment]:
        with self._lock:
            new, self._new = self._new, {}
            self.pending = False
        return new

    def _run(self) -> None:
        topic, group = self.settings.topics.control, self.settings.kafka.group_id
        consumer = _control_consumer(self.settings, "follow")
        try:
            # From where the start-up read ended, not from the beginning: compaction never
            # touches the active segment, so the topic holds a route's earlier deployments too,
            # and one handed out in a poll before the latest would be loaded and served as if
            # it were new. Nothing slips: the start-up read went to these offsets.
            while not self._stop.is_set():
                try:
                    parts = _partitions(consumer, topic, 10.0)
                except KafkaException as exc:
                    self.error = str(exc)
                    self._stop.wait(FOLLOW_POLL_S)
                    continue
                if parts:
                    self.error = None
                    break
                self._stop.wait(FOLLOW_POLL_S)
            else:
                return
            consumer.assign([TopicPartition(topic, p, self._start.get(p, OFFSET_BEGINNING)) for p in parts])
            while not self._stop.is_set():
                msgs = consumer.consume(100, FOLLOW_POLL_S)
                seen: dict[str, Deployment] = {}
                for m in msgs:
                    if m.error() is not None:
                        # Transient errors (a broker restarting) are retried by librdkafka; only a
                        # fatal one stops the follower from seeing new deployments.
                        if m.error().fatal():
                            self.error = m.error().str()
                        continue
                    _take(m, group, seen)
                seen = {r: d for r, d in seen.items() if r in self.routes}
                if seen:
                    with self._lock:
                        self._new.update(seen)
                        self.pending = True
        except Exception as exc:  # noqa: BLE001 - the worker goes on with what it runs; say so
            log.exception("control topic follower stopped")
            self.error = str(exc)
        finally:
            consumer.close()


class DeploymentLoader:
    """Builds a deployment's scoring pool in a background thread (loads, warms, checks)."""

    def __init__(self, deployment: Deployment, build):
        self.deployment = deployment
        self.pool = None
        self.error: str | None = None
        self.started = time.monotonic()
        self._build = build
        self._done = threading.Event()
        # Set before the thread starts (a build that fails at once reads it), and read with
        # `pool` under the lock, so the built pool is shut down exactly once when abandoned.
        self._abandoned = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"load-{deployment.id}", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def abandon(self) -> None:
        """Not wanted any more (the worker stops, or a newer deployment replaces this one):
        a pool still loading is shut down as soon as it is built."""
        with self._lock:
            self._abandoned = True
            orphan = self.pool if self._done.is_set() else None
        if orphan is not None:
            orphan.shutdown(wait=False, cancel=True)

    def _run(self) -> None:
        pool = None
        try:
            pool = self._build(self.deployment)
        except Exception as exc:  # noqa: BLE001 - refused: the reason goes to the log and the audit topic
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self.pool = pool
                self._done.set()
                orphan = pool if self._abandoned else None
        if orphan is not None:
            orphan.shutdown(wait=False, cancel=True)


@dataclass
class _Sample:
    at: float
    rows: int
    rejects: int
    infer_s: list
    hist: np.ndarray


class CanaryGuard:
    """A route's canary against its primary over ``window_s``: dead-letter share, score PSI, p99.

    ``add`` per emitted batch (the batch's role stats), ``verdict`` at most once a second;
    a non-empty verdict is the reason to roll the canary back.
    """

    def __init__(self, guard: GuardSettings):
        self.guard = guard
        self._samples: dict[str, deque[_Sample]] = {"primary": deque(), "canary": deque()}

    def reset(self) -> None:
        for q in self._samples.values():
            q.clear()

    def add(self, role_stats: dict, now: float) -> None:
        for role in ("primary", "canary"):
            st = role_stats.get(role)
            if st is None:
                continue
            rows, rejects, infer_s, hist = st
            self._samples[role].append(_Sample(now, rows, rejects, [infer_s], np.asarray(hist)))

    def _window(self, role: str, now: float) -> tuple[int, int, list, np.ndarray]:
        q = self._samples[role]
        while q and now - q[0].at > self.guard.window_s:
            q.popleft()
        rows = sum(s.rows for s in q)
        rejects = sum(s.rejects for s in q)
        times = [t for s in q for t in s.infer_s]
        hist = sum((s.hist for s in q), np.zeros(10, dtype=np.int64))
        return rows, rejects, times, hist

    def verdict(self, now: float) -> str:
        """Why the canary must go ('' while it may stay, or before ``min_events``)."""
        g = self.guard
        c_rows, c_rej, c_times, c_hist = self._window("canary", now)
        if c_rows + c_rej < g.min_events:
            return ""
        if g.max_dlq_rate:
            rate = c_rej / (c_rows + c_rej)
            if rate > g.max_dlq_rate:
                return f"canary dead-letter rate {rate:.3f} > max_dlq_rate {g.max_dlq_rate:g} over {g.window_s:g}s"
        if g.max_p99_ms and c_times:
            p99 = float(np.quantile(np.asarray(c_times), 0.99)) * 1000.0
            if p99 > g.max_p99_ms:
                return f"canary p99 inference time {p99:.1f} ms > max_p99_ms {g.max_p99_ms:g} over {g.window_s:g}s"
        if g.max_psi:
            p_rows, _, _, p_hist = self._window("primary", now)
            if p_rows >= g.min_events:
                value = float(psi(p_hist / p_hist.sum(), c_hist.astype(np.float64)))
                if math.isfinite(value) and value > g.max_psi:
                    return (f"PSI {value:.3f} between canary and primary scores > max_psi {g.max_psi:g} "
                            f"over {g.window_s:g}s")
        return ""


def route_of_topics(routes: list[RouteSettings]) -> dict[str, str]:
    """input topic -> route name."""
    return {t: r.name for r in routes for t in r.input_topics}
