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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from workers.drift import DriftCounts, RefBins, count_batch, load_reference
from workers.features import Featurizer, ModelSpec, Reject
from workers.inference import create_backend
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


@dataclass
class ScoredBatch:
    """What the orchestrator needs to emit one batch (small: no feature matrix, no raw values)."""

    records: list[bytes]         # score record values, one per scored row, in batch order
    positions: np.ndarray        # int64: the batch index of each record's input message
    rejects: list[Reject]        # batch indices that become dead letters, with reasons
    event_ts: np.ndarray         # float64: each record's event timestamp (NaN when absent)
    drift: DriftCounts | None    # counts of the scored rows; None when drift is off
    queue_wait_s: float = 0.0    # submitted -> scoring started
    infer_s: float = 0.0         # the backend calls


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
        self.encoder = ScoreEncoder(self.spec.name, self.spec.version, self.spec.threshold)
        self.ref: RefBins | None = load_reference(self.spec) if config.drift else None

    def describe(self) -> dict:
        return self.backend.describe()

    def close(self) -> None:
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
        fb = self.featurizer.featurize(values)
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
        records = self.encoder.encode(event_ids, scores, src_topics, src_partitions, src_offsets, event_ts, time.time())
        return ScoredBatch(
            records, positions, rejects, event_ts, drift,
            queue_wait_s=max(0.0, start - submitted_at) if submitted_at is not None else 0.0, infer_s=infer_s,
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
