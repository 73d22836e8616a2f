"""Scoring one batch: featurize → infer → drift counts → encode the score records.

This is all of the worker's per-event work except consuming and producing. It
needs no Kafka client: it takes a batch's raw values and source coordinates and
returns what the orchestrator produces. That is why it can run in the scoring
processes of :mod:`workers.inference.pool`, beside the orchestrator's GIL
instead of under it (see that module for the measurements).

Per batch:

1. :class:`workers.features.Featurizer` decodes, validates and featurizes the
   values; bad records become rejects (dead letters) with a reason.
2. The backend scores the feature matrix. A batch whose inference raises is
   split in halves and retried down to single rows, so one poison row becomes
   one dead letter (``inference_error``) instead of failing its neighbours.
   A non-finite score becomes a dead letter (``non_finite_score``).
3. :func:`workers.drift.count_batch` counts the scored rows into drift bins.
4. :class:`workers.records.ScoreEncoder` writes one JSON record per scored row;
   ``scored_at`` is the time of this step.

A live deployment (:mod:`workers.control`) adds two things per batch:

- **Canary**: the rows whose ``event_id`` hashes below the canary's fraction
  (:func:`canary_mask`, CRC-32 of the id: the same event picks the same model on
  every replica and every replay) are scored by the canary instead of the primary,
  with its own featurizer. Records keep batch order.
- **Shadow**: every shadow model scores the whole batch too; its records
  (``role: "shadow"``) are returned beside the primary's, its rejects only counted.

Every record carries its lineage (model digest, role, deployment, worker), and
``role_stats`` counts rows, rejects, inference time and a score histogram per
model for the canary guard.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from workers.drift import DriftCounts, RefBins, count_batch, load_reference
from workers.features import FeatureBatch, Featurizer, ModelSpec, Reject
from workers.inference import create_backend
from workers.profiling import stage
from workers.records import ScoreEncoder


@dataclass(frozen=True)
class ScorerConfig:
    """Everything a scoring process needs to build its :class:`BatchScorer` (picklable)."""

    model_path: Path
    backend: str = "onnxruntime"
    device: str = "cpu"
    intra_op_threads: int = 1
    warmup_batch_sizes: tuple[int, ...] = (1,)
    drift: bool = True
    # Lineage written into every record ("" / empty: records without it, e.g. `sluice score`).
    role: str = ""
    deployment: str = ""
    sha256: str = ""
    worker: tuple[tuple[str, str], ...] = ()
    degraded: bool = False   # a fallback serving under pressure: its records say `"degraded": true`
    # A live deployment's other models (each with its own lineage); fraction: the canary's share.
    canary: "ScorerConfig | None" = None
    fraction: float = 0.0
    shadow: tuple["ScorerConfig", ...] = ()


@dataclass
class ScoredBatch:
    """What the orchestrator needs to emit one batch (small: no feature matrix, no raw values)."""

    records: list[bytes]         # score record values, one per scored row, in batch order
    positions: np.ndarray        # int64: the batch index of each record's input message
    rejects: list[Reject]        # batch indices that become dead letters, with reasons
    event_ts: np.ndarray         # float64: each record's event timestamp (NaN when absent)
    drift: DriftCounts | None    # counts of the primary's scored rows; None when drift is off
    queue_wait_s: float = 0.0    # submitted -> scoring started
    infer_s: float = 0.0         # the backend calls
    canary_drift: DriftCounts | None = None   # counts of the canary's rows (its own reference)
    # per shadow model: its records and the batch index of each record's input message
    shadow: list[tuple[list[bytes], np.ndarray]] = field(default_factory=list)
    # role -> (rows scored, rows rejected, backend seconds, score histogram (SCORE_HIST_BINS on [0, 1]))
    role_stats: dict[str, tuple[int, int, float, np.ndarray]] = field(default_factory=dict)
    scores: np.ndarray | None = None   # float32, one per record (the guard and shadow agreement)
    # per shadow model: (events both it and the primary/canary scored, of those with the same label)
    shadow_agreement: list[tuple[int, int]] = field(default_factory=list)


# The guard compares canary and primary score distributions on this histogram (as drift does).
SCORE_HIST_BINS = 10


def canary_mask(event_ids: Sequence[str], fraction: float) -> np.ndarray:
    """Which rows go to the canary: CRC-32 of the event id below ``fraction`` of its range.

    Deterministic and stateless: a replay after an abort or a crash, on any replica, picks
    the same model for the same event.
    """
    if fraction <= 0 or not event_ids:
        return np.zeros(len(event_ids), dtype=bool)
    limit = int(fraction * 2**32)
    crc = zlib.crc32
    return np.fromiter((crc(e.encode()) < limit for e in event_ids), dtype=bool, count=len(event_ids))


def _hist(scores: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(scores, 0.0, 1.0), bins=SCORE_HIST_BINS, range=(0.0, 1.0))[0]


class BatchScorer:
    """One model, loaded and warm: scores whole batches. Not thread-safe (one per thread or process)."""

    def __init__(self, config: ScorerConfig):
        self.config = config
        self.spec = ModelSpec.load(config.model_path)
        self.featurizer = Featurizer(self.spec)
        self.backend = create_backend(
            self.spec, backend=config.backend, device=config.device, threads=config.intra_op_threads
        )
        self.backend.warmup(list(config.warmup_batch_sizes))
        self.encoder = ScoreEncoder(self.spec.name, self.spec.version, self.spec.threshold, sha256=config.sha256,
                                    role=config.role, deployment=config.deployment, worker=dict(config.worker),
                                    degraded=config.degraded)
        self.ref: RefBins | None = load_reference(self.spec) if config.drift else None
        self.canary = BatchScorer(config.canary) if config.canary is not None else None
        self.shadows = [BatchScorer(c) for c in config.shadow]

    def describe(self) -> dict:
        return self.backend.describe()

    def close(self) -> None:
        for other in ([self.canary] if self.canary is not None else []) + self.shadows:
            other.close()
        close = getattr(self.backend, "close", None)
        if close is not None:  # GPU backends free device buffers here
            close()

    def score(
        self,
        values: Sequence[bytes | None],
        topics: str | Sequence[str],
        partitions: Sequence[int],
        offsets: Sequence[int],
        submitted_at: float | None = None,
    ) -> ScoredBatch:
        """Score one batch. ``topics`` is one name for the whole batch or one per value.

        ``submitted_at`` is a ``time.monotonic()`` reading (system-wide on Linux, so it
        may come from another process) for the queue-wait figure.
        """
        start = time.monotonic()
        with stage("featurize"):
            fb = self.featurizer.featurize(values)
        if self.canary is None:
            out = self._score_features(fb, values, topics, partitions, offsets, start, submitted_at)
        else:
            out = self._score_with_canary(fb, values, topics, partitions, offsets, start, submitted_at)
        for shadow in self.shadows:
            sb = shadow.score(values, topics, partitions, offsets)
            out.shadow.append((sb.records, sb.positions))
            both = np.isin(out.positions, sb.positions, assume_unique=True)
            mine = out.scores[both] >= self.spec.threshold
            theirs = sb.scores[np.isin(sb.positions, out.positions, assume_unique=True)] >= shadow.spec.threshold
            out.shadow_agreement.append((int(both.sum()), int((mine == theirs).sum())))
            out.role_stats.update(sb.role_stats)
        return out

    def _score_with_canary(self, fb, values, topics, partitions, offsets, start, submitted_at) -> ScoredBatch:
        """Primary for most rows, the canary for those :func:`canary_mask` picks; batch order kept."""
        mask = canary_mask(fb.event_ids, self.config.fraction)
        if not mask.any():
            return self._score_features(fb, values, topics, partitions, offsets, start, submitted_at)
        keep = ~mask
        mine = FeatureBatch(fb.matrix[keep], fb.positions[keep], [e for e, k in zip(fb.event_ids, keep.tolist()) if k],
                            fb.event_ts[keep], fb.rejects, fb.raw[keep])
        primary = self._score_features(mine, values, topics, partitions, offsets, start, submitted_at)
        picked = fb.positions[mask]  # batch indexes the canary scores (from its own featurizer)
        sub = picked.tolist()
        ctopics = topics if isinstance(topics, str) else [topics[i] for i in sub]
        canary = self.canary.score([values[i] for i in sub], ctopics, [partitions[i] for i in sub],
                                   [offsets[i] for i in sub])
        cpos = picked[canary.positions]
        positions = np.concatenate([primary.positions, cpos])
        order = np.argsort(positions, kind="stable")
        records = primary.records + canary.records
        rejects = list(primary.rejects) + [Reject(int(picked[r.position]), r.reason, r.detail) for r in canary.rejects]
        return ScoredBatch(
            [records[i] for i in order.tolist()], positions[order], rejects,
            np.concatenate([primary.event_ts, canary.event_ts])[order], primary.drift,
            queue_wait_s=primary.queue_wait_s, infer_s=primary.infer_s + canary.infer_s,
            canary_drift=canary.drift,
            role_stats={**primary.role_stats, **canary.role_stats},
            scores=np.concatenate([primary.scores, canary.scores])[order],
        )

    def _score_features(self, fb: FeatureBatch, values, topics, partitions, offsets, start: float,
                        submitted_at: float | None) -> ScoredBatch:
        """Infer, count drift and encode the rows of a featurized batch."""
        with stage("infer"):
            scores, failed, infer_s = self._infer(fb.matrix)

        positions, event_ids, event_ts, raw = fb.positions, fb.event_ids, fb.event_ts, fb.raw
        rejects = fb.rejects
        ok = np.isfinite(scores)
        if not ok.all():
            rejects = list(rejects)
            for row in np.flatnonzero(~ok).tolist():
                if row in failed:
                    rejects.append(Reject(int(positions[row]), "inference_error", failed[row]))
                else:
                    rejects.append(Reject(int(positions[row]), "non_finite_score",
                                          f"model returned a non-finite score ({scores[row]!r})"))
            positions, scores, event_ts, raw = positions[ok], scores[ok], event_ts[ok], raw[ok]
            event_ids = [e for e, good in zip(event_ids, ok.tolist()) if good]

        drift = count_batch(self.ref, raw, scores, event_ts) if self.ref is not None else None
        n = len(positions)
        if n == len(values):  # no rejects: the rows are the batch, in order
            src_topics = topics
            src_partitions, src_offsets = partitions, offsets
        else:
            pos = positions.tolist()
            src_topics = topics if isinstance(topics, str) else [topics[i] for i in pos]
            src_partitions = [partitions[i] for i in pos]
            src_offsets = [offsets[i] for i in pos]
        with stage("encode"):
            records = self.encoder.encode(event_ids, scores, src_topics, src_partitions, src_offsets, event_ts,
                                          time.time())
        role = self.config.role or "primary"
        return ScoredBatch(
            records, positions, rejects, event_ts, drift,
            queue_wait_s=max(0.0, start - submitted_at) if submitted_at is not None else 0.0, infer_s=infer_s,
            role_stats={role: (n, len(rejects), infer_s, _hist(scores))}, scores=scores,
        )

    def _infer(self, matrix: np.ndarray) -> tuple[np.ndarray, dict[int, str], float]:
        start = time.perf_counter()
        scores = np.full(len(matrix), np.nan, dtype=np.float32)
        failed: dict[int, str] = {}
        if len(matrix):
            self._infer_split(matrix, 0, scores, failed)
        return scores, failed, time.perf_counter() - start

    def _infer_split(self, matrix: np.ndarray, base: int, out: np.ndarray, failed: dict[int, str]) -> None:
        try:
            out[base : base + len(matrix)] = self.backend.infer(matrix)
        except Exception as exc:  # noqa: BLE001 - any backend failure is isolated, not fatal
            if len(matrix) == 1:
                failed[base] = f"{type(exc).__name__}: {exc}"
                return
            mid = len(matrix) // 2
            self._infer_split(matrix[:mid], base, out, failed)
            self._infer_split(matrix[mid:], base + mid, out, failed)
