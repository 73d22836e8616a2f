"""Scoring threads: the :class:`ScoringPool` of ``inference.processes = 0``.

``threads`` daemon threads inside the worker process, each with its own
:class:`~workers.scoring.BatchScorer`, take batches from one queue. A thread
checks a batch's generation before it begins it, so a batch dropped while
queued is never scored. A thread cannot be killed: one whose backend hangs is
abandoned (the pool is broken with :class:`ScoringTimeout`, its scorer left
open), and being a daemon it cannot hold up the worker's exit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import BrokenExecutor, Future, InvalidStateError
from concurrent.futures import wait as futures_wait
from typing import Sequence

from workers.inference.pool import (
    START_TIMEOUT_S,
    ModelLoadFailed,
    ScoringFuture,
    ScoringPool,
    ScoringStartHung,
)
from workers.scoring import BatchScorer

log = logging.getLogger("workers.inference.pool")

# With nothing to wake it (no deadline, no batch being scored yet), ``wait`` still looks again this often.
IDLE_WAKE_S = 1.0


class ThreadScoringPool(ScoringPool):
    """``threads`` scoring threads, each with its own model."""

    in_process = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = self.executors
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._scorers: list[BatchScorer | None] = [None] * n
        # Per thread, while it scores: the batch's future and when it began (read by wait's hang check).
        self._current: list[ScoringFuture | None] = [None] * n
        self._began = [0.0] * n
        self._pending: deque[ScoringFuture] = deque()  # submitted, maybe not done (pruned as they finish)
        self._broken: BrokenExecutor | None = None

    def start(self, timeout: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        hellos: list[Future] = []
        for i in range(self.executors):
            hello: Future = Future()
            hellos.append(hello)
            t = threading.Thread(target=self._run, args=(i, hello), name=f"sluice-score_{i}", daemon=True)
            self._threads.append(t)
            t.start()
        described: dict = {}
        for hello in hellos:  # all load their models at once
            done, _ = futures_wait([hello], max(0.0, deadline - time.monotonic()))
            if not done:
                raise ScoringStartHung(f"the model was not loaded and warm within {timeout:.0f}s")
            described = hello.result()  # ModelLoadFailed
        log.info("scoring executors ready", extra={
            "mode": "thread", "executors": self.executors, "pids": [], "backend": described,
        })
        return described

    def _run(self, i: int, hello: Future) -> None:
        try:
            scorer = BatchScorer(self.config)
            described = scorer.describe()
        except Exception as exc:  # noqa: BLE001 - the reason fails the pool's start
            hello.set_exception(ModelLoadFailed(f"{type(exc).__name__}: {exc}"))
            return
        self._scorers[i] = scorer
        hello.set_result(described)
        tasks, current, began = self._tasks, self._current, self._began
        while True:
            task = tasks.get()
            if task is None:
                return
            fut, args = task
            if fut.generation != self.generation or fut.done():
                continue  # dropped before it began: never scored
            began[i] = time.monotonic()  # before `current`: wait's hang check reads them in that order
            current[i] = fut
            try:
                result = scorer.score(*args)
            except Exception as exc:  # noqa: BLE001 - the worker decides (it stops, exit 70)
                _settle(fut, None, exc)
            else:
                _settle(fut, result, None)
            current[i] = None

    def submit(self, values: Sequence[bytes | None], topics: str | Sequence[str], partitions: Sequence[int],
               offsets: Sequence[int]) -> ScoringFuture:
        self._busy += 1
        fut = ScoringFuture(self, self.generation)
        if self._broken is not None:
            fut.set_exception(type(self._broken)(*self._broken.args))
            return fut
        pending = self._pending
        while pending and pending[0].done():  # amortised O(1): futures finish in about submission order
            pending.popleft()
        pending.append(fut)
        self._tasks.put((fut, (values, topics, partitions, offsets, time.monotonic())))
        return fut

    def wait(self, fut: Future, timeout: float | None) -> bool:
        if fut.done():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            hang_at = self._check_hung(now)
            if fut.done():
                return True
            if deadline is not None and now >= deadline:
                return False
            left = self._next_wait(deadline, hang_at, now)
            # Capped: a batch a thread takes up meanwhile has its own hang clock to check.
            futures_wait([fut], IDLE_WAKE_S if left is None else min(left, IDLE_WAKE_S))
            if fut.done():
                return True

    def _check_hung(self, now: float) -> float | None:
        hang_at = None
        for i, fut in enumerate(self._current):
            # A batch dropped while its thread still scores it (cancelled) keeps its clock: a
            # hung backend must end the worker even after an abort dropped its batch.
            if fut is None or (fut.done() and not fut.cancelled()):
                continue
            at = self._began[i] + self.deadline_s
            if now >= at:
                self._break(self._timeout(f"scoring thread {i}"))
                log.error("scoring thread hung; abandoning it",
                          extra={"scoring_thread": i, "deadline_s": self.deadline_s})
                raise type(self._broken)(*self._broken.args)
            if hang_at is None or at < hang_at:
                hang_at = at
        return hang_at

    def _break(self, exc: BrokenExecutor) -> None:
        self._broken = exc
        for fut in self._pending:
            _settle(fut, None, type(exc)(*exc.args))
        self._pending.clear()

    def drop_all(self) -> int:
        self._bump_generation()  # a queued batch is skipped; a running one is thrown away
        dropped = 0
        for fut in self._pending:
            if not fut.done():
                dropped += fut.cancel()
        self._pending.clear()
        return dropped

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._broken is None:
            self._broken = BrokenExecutor("the scoring pool was shut down")
        if cancel:
            while True:
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        if not wait:
            return
        deadline = time.monotonic() + self.stop_timeout_s
        for i, t in enumerate(self._threads):
            fut = self._current[i]
            if self._scorers[i] is None or (fut is not None and fut.done()):
                continue  # still loading its model, or scoring a dropped batch: nothing to wait for
            t.join(max(0.0, deadline - time.monotonic()))
        for i, t in enumerate(self._threads):
            if t.is_alive():
                # Its backend may be in use: leave it open (a daemon thread does not block exit).
                log.warning("scoring thread did not stop in time; abandoning it", extra={"scoring_thread": i})
                continue
            scorer, self._scorers[i] = self._scorers[i], None
            if scorer is not None:
                # Freed only now: no thread can be running a batch on it (GPU buffers).
                scorer.close()
        for fut in self._pending:
            if not fut.done():
                _settle(fut, None, BrokenExecutor("the scoring pool was shut down"))
        self._pending.clear()


def _settle(fut: Future, result, exc: BaseException | None) -> None:
    """Complete ``fut`` unless it was dropped (cancelled) or failed meanwhile."""
    try:
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
    except InvalidStateError:
        pass
