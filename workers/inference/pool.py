"""Where batches are scored: dedicated scoring processes (the default) or threads.

Each executor holds its own :class:`workers.scoring.BatchScorer` (model loaded
and warm) and scores whole batches: featurize → infer → drift counts → encode.
The orchestrator submits batches in order and consumes their futures in the
same order, so emission keeps per-partition order whatever the executors'
timing.

Why processes: per event, the orchestrator's own work (consume, produce,
offsets) costs about as much as a bare consume → produce loop; decoding,
featurizing and encoding cost as much again, and all of it is Python holding
the GIL, so threads cannot overlap it (tried: moving the numpy work onto the
inference threads convoyed on the GIL and cut throughput). In a process of its
own, a batch is scored on another core while the orchestrator produces the
previous one. The price is one pickled round trip per batch (values out,
records back: about 0.2 µs per event) and a second copy of the model.
``inference.processes = 0`` scores on ``inference.threads`` threads inside the
worker process instead (one process to watch; slower on a busy CPU).

Scoring processes are started with ``spawn`` (never ``fork``: the worker has
librdkafka and metrics threads by then), ignore SIGINT/SIGTERM (the
orchestrator decides when to drain; a Ctrl-C reaches the whole process group),
and exit by themselves when the worker process is gone (SIGKILL), so a killed
replica never leaves scoring processes behind. A scoring process that dies
breaks the pool: every pending future raises ``BrokenProcessPool`` and the
worker stops (exit 70) with the open transaction aborted.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Sequence

from workers.scoring import BatchScorer, ScoredBatch, ScorerConfig

log = logging.getLogger(__name__)

# Loading and warming a model in every executor: a TensorRT engine build can take minutes.
START_TIMEOUT_S = 600.0
# How often a scoring process checks that the worker process still exists (bounds how long
# an orphan of a SIGKILLed worker keeps its model in memory).
ORPHAN_CHECK_S = 0.5
# Cyclic-GC generation-0 threshold in scoring processes (see pipeline.GC_GEN0_THRESHOLD).
GC_GEN0_THRESHOLD = 50_000


class ScoringStartError(RuntimeError):
    """An executor could not load or warm the model (the message says why)."""


# Per executor state: in a scoring process the tasks run on its main thread, in thread mode
# on the pool's threads; a thread-local serves both.
_local = threading.local()


def _init_executor(config: ScorerConfig, in_process: bool, log_level: str, log_format: str, started,
                   made: list | None = None) -> None:
    """Runs once in every executor before its first task; never raises (errors surface in tasks).

    ``started`` is a barrier of all the pool's executors (see :meth:`ScoringPool.start`);
    ``made`` (thread mode) collects the scorers, for the pool to close their backends.
    """
    _local.started = started
    if in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        from workers import logs

        logs.setup(log_level, log_format)
        _watch_parent(os.getppid())
    try:
        _local.scorer = BatchScorer(config)
        _local.error = None
        if made is not None:
            made.append(_local.scorer)
    except Exception as exc:  # noqa: BLE001 - reported by the first task, with its message
        _local.scorer = None
        _local.error = f"{type(exc).__name__}: {exc}"
    if in_process:
        gc.collect()
        gc.freeze()
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(ORPHAN_CHECK_S)
        os._exit(0)  # the worker is gone; its transaction is aborted by the broker

    threading.Thread(target=watch, name="sluice-orphan-check", daemon=True).start()


def _scorer() -> BatchScorer:
    scorer = getattr(_local, "scorer", None)
    if scorer is None:
        raise ScoringStartError(getattr(_local, "error", None) or "scoring executor not initialised")
    return scorer


def _hello(timeout: float) -> dict:
    # Every executor must answer one hello: each waits for all the others, so no executor can
    # answer two and the pool knows every process (and that every model loaded).
    _local.started.wait(timeout)
    return {"pid": os.getpid(), **_scorer().describe()}


def _score(values, topics, partitions, offsets, submitted_at) -> ScoredBatch:
    return _scorer().score(values, topics, partitions, offsets, submitted_at)


class ScoringPool:
    """``processes`` scoring processes, or (``processes=0``) ``threads`` scoring threads."""

    def __init__(self, config: ScorerConfig, processes: int = 1, threads: int = 1,
                 log_level: str = "INFO", log_format: str = "auto"):
        self.config = config
        self.in_process = processes > 0
        self.executors = processes if self.in_process else threads
        self.executors = max(1, self.executors)
        if self.in_process:
            ctx = multiprocessing.get_context("spawn")
            started = ctx.Barrier(self.executors)
        else:
            started = threading.Barrier(self.executors)
        init = (config, self.in_process, log_level, log_format, started)
        self._scorers: list[BatchScorer] = []  # thread mode only
        self._executor: Executor
        if self.in_process:
            self._executor = ProcessPoolExecutor(
                max_workers=processes, mp_context=ctx,
                initializer=_init_executor, initargs=init,
            )
        else:
            self._executor = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="sluice-score", initializer=_init_executor,
                initargs=(*init, self._scorers),
            )
        self._busy = 0
        self.pids: list[int] = []  # the scoring processes (empty in thread mode)

    def start(self, timeout: float = START_TIMEOUT_S) -> dict:
        """Start every executor and wait until each has its model warm; the backend's description.

        Raises :class:`ScoringStartError` naming what failed (unknown backend, no GPU, ...).
        """
        deadline = time.monotonic() + timeout
        futures = [self._executor.submit(_hello, timeout) for _ in range(self.executors)]
        described: dict = {}
        for fut in futures:
            try:
                info = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise ScoringStartError(f"the model was not loaded and warm within {timeout:.0f}s") from None
            except ScoringStartError:
                raise
            except threading.BrokenBarrierError:
                raise ScoringStartError(f"not every scoring executor started within {timeout:.0f}s") from None
            except Exception as exc:  # e.g. BrokenProcessPool: a scoring process died while loading
                raise ScoringStartError(f"a scoring executor failed to start: {type(exc).__name__}: {exc}") from exc
            if self.in_process:
                self.pids.append(info["pid"])
            described = {k: v for k, v in info.items() if k != "pid"}
        log.info("scoring executors ready", extra={
            "mode": "process" if self.in_process else "thread", "executors": self.executors,
            "pids": self.pids if self.in_process else [], "backend": described,
        })
        return described

    @property
    def idle(self) -> bool:
        return self._busy < self.executors

    def submit(self, values: Sequence[bytes | None], topics: str | Sequence[str], partitions: Sequence[int],
               offsets: Sequence[int]) -> Future:
        """Score one batch; the future's result is a :class:`ScoredBatch`."""
        self._busy += 1  # only the orchestrator thread submits and collects
        return self._executor.submit(_score, values, topics, partitions, offsets, time.monotonic())

    def collected(self) -> None:
        """The orchestrator took one result (keeps `idle` exact without a lock)."""
        self._busy -= 1

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop the executors; ``cancel`` drops queued batches (a running one always finishes)."""
        self._executor.shutdown(wait=wait, cancel_futures=cancel)
        if not self.in_process and wait:
            # Free the backends (GPU buffers) only now: no thread can be running a batch on them.
            while self._scorers:
                self._scorers.pop().close()
