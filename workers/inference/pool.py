"""The dedicated inference thread pool.

Batches are submitted in order and their futures are consumed in the same
order by the orchestrator, so emission keeps per-partition order. Backends
release the GIL while they run (onnxruntime, TensorRT, torch), so
``inference.threads`` threads overlap inference with decoding on the
orchestrator thread.

A batch whose inference raises is split in halves and retried down to single
rows: one poison row becomes one dead letter (reason ``inference_error``)
instead of failing its neighbours or crashing the worker.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class InferenceResult:
    scores: np.ndarray                 # float32 [n]; NaN where failed
    failed: dict[int, str] = field(default_factory=dict)  # row -> error detail
    queue_wait_s: float = 0.0
    infer_s: float = 0.0


class InferencePool:
    """Runs ``backend.infer`` on dedicated threads."""

    def __init__(self, backend, threads: int):
        self.backend = backend
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sluice-infer")
        self._busy = 0

    @property
    def idle(self) -> bool:
        return self._busy < self.threads

    def submit(self, matrix: np.ndarray) -> Future:
        self._busy += 1  # only the orchestrator thread submits and collects
        fut = self._executor.submit(self._run, matrix, time.perf_counter())
        return fut

    def collected(self) -> None:
        """The orchestrator took one result (keeps `idle` exact without a lock)."""
        self._busy -= 1

    def _run(self, matrix: np.ndarray, submitted: float) -> InferenceResult:
        start = time.perf_counter()
        if len(matrix) == 0:
            return InferenceResult(np.empty(0, np.float32), queue_wait_s=start - submitted)
        scores = np.full(len(matrix), np.nan, dtype=np.float32)
        failed: dict[int, str] = {}
        self._infer_split(matrix, 0, scores, failed)
        return InferenceResult(scores, failed, start - submitted, time.perf_counter() - start)

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

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop the threads; ``cancel`` drops queued batches (a running one always finishes)."""
        self._executor.shutdown(wait=wait, cancel_futures=cancel)
