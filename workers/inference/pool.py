"""Where batches are scored: dedicated scoring processes (the default) or threads.

Each executor holds its own :class:`workers.scoring.BatchScorer` (model loaded
and warm) and scores whole batches: featurize → infer → drift counts → encode.
The orchestrator submits batches in order and consumes their futures in the
same order, so emission keeps per-partition order whatever the executors'
timing.

This module is the contract and the policy shared by both kinds of pool;
:mod:`workers.inference.process_pool` (scoring processes, fed through the pipes
of :mod:`workers.inference.pipes`) and :mod:`workers.inference.thread_pool`
(``inference.processes = 0``) implement it. ``ScoringPool(config, processes=N,
threads=M)`` builds the one the settings ask for.

Why processes: per event, the orchestrator's own work (consume, produce,
offsets) costs about as much as a bare consume → produce loop; decoding,
featurizing and encoding cost as much again, and all of it is Python holding
the GIL, so threads cannot overlap it (tried: moving the numpy work onto the
inference threads convoyed on the GIL and cut throughput). In a process of its
own, a batch is scored on another core while the orchestrator produces the
previous one. The price is one pickled round trip per batch (values out,
records back) and a second copy of the model. Threads: one process to watch;
slower on a busy CPU.

The contract (only the orchestrator thread calls a pool):

- ``submit(values, topics, partitions, offsets)`` → a :class:`ScoringFuture`
  whose result is a :class:`workers.scoring.ScoredBatch`; never blocks.
- ``wait(future, timeout)`` → whether it is done, waiting at most ``timeout``
  seconds (``None``: until it is). Never longer than the scoring deadline
  either: an executor that has had a batch for :data:`SCORING_DEADLINE_S`
  without answering is hung, and ``wait`` raises :class:`ScoringTimeout` (the
  pool is then broken: every pending future fails at once and the worker ends
  with exit 70, the open transaction aborted, nothing committed lost).
- ``collected()`` once per result the orchestrator took (keeps ``idle`` exact).
- ``drop_all()``: abort, revoke and lost partitions. Bumps the pool's
  generation; every batch submitted before is cancelled: one not yet handed to
  an executor is never scored, one being scored is thrown away when it comes
  back. Returns at once, whatever a backend does.
- ``idle``, ``writing``, ``pids``, ``shutdown(wait, cancel)`` (bounded too: a
  process that does not stop in time is killed).

A scoring process that dies breaks the pool: every pending future raises
``BrokenProcessPool`` (a :class:`concurrent.futures.BrokenExecutor`, as
:class:`ScoringTimeout` is) and the worker stops (exit 70) with the open
transaction aborted.
"""

from __future__ import annotations

import abc
from concurrent.futures import BrokenExecutor, Future
from typing import Sequence

from workers.scoring import ScorerConfig

# Loading and warming a model in every executor: a TensorRT engine build can take minutes.
START_TIMEOUT_S = 600.0
# How long an executor may hold a batch without answering before it is declared hung
# (ScoringTimeout). Without it, a backend that never returns (a wedged GPU driver, a deadlocked
# runtime, a SIGSTOPped scoring process) would stall the worker for good: in-flight batches
# full, partitions paused but still owned, lag growing, no exit for the supervisor to act on,
# and a revoke waiting on it until max.poll.interval.ms (300 s by default) evicts the member.
# Far above any sane batch (milliseconds to a second or two) and well under that interval.
SCORING_DEADLINE_S = 60.0
# At shutdown: how long an executor may take to finish its batch and exit before it is
# killed (a batch of a slow model; a hung backend must not hang the worker's exit).
STOP_TIMEOUT_S = 30.0


class ScoringStartError(RuntimeError):
    """The executors could not start; the subclass says whose fault (the message says why)."""


class ScoringStartHung(ScoringStartError):
    """An executor did not load and warm its model within the start timeout (retry: exit 70)."""


class ScoringProcessDied(ScoringStartError):
    """A scoring process died before it was ready, e.g. killed by the OOM killer (exit 70)."""


class ModelLoadFailed(ScoringStartError):
    """The model, its backend or its device cannot be used (the configuration's fault: exit 2)."""


class ScoringTimeout(BrokenExecutor):
    """An executor held a batch longer than the scoring deadline: its backend hangs.

    The pool is broken from then on (a hung scoring process is killed); the worker ends
    with exit 70 and the open transaction aborted.
    """


class ScoringFuture(Future):
    """A batch's future. Waiting on it goes through its pool, so it is bounded by the scoring
    deadline and (process mode) works the pool's pipes. Only the orchestrator thread may wait.
    """

    def __init__(self, pool: "ScoringPool", generation: int):
        super().__init__()
        self._pool = pool
        self.generation = generation

    def result(self, timeout: float | None = None):
        self._pool.wait(self, timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None):
        self._pool.wait(self, timeout)
        return super().exception(timeout=0)


class ScoringPool(abc.ABC):
    """``processes`` scoring processes, or (``processes=0``) ``threads`` scoring threads.

    Calling ``ScoringPool(...)`` builds a :class:`~workers.inference.process_pool.ProcessScoringPool`
    or a :class:`~workers.inference.thread_pool.ThreadScoringPool`. ``deadline_s`` is the
    scoring deadline (:data:`SCORING_DEADLINE_S`), ``stop_timeout_s`` the shutdown's
    (:data:`STOP_TIMEOUT_S`).
    """

    in_process: bool

    def __new__(cls, *args, **kwargs):
        if cls is ScoringPool:
            processes = kwargs.get("processes", args[1] if len(args) > 1 else 1)
            if processes > 0:
                from workers.inference.process_pool import ProcessScoringPool as cls
            else:
                from workers.inference.thread_pool import ThreadScoringPool as cls
        return super().__new__(cls)

    def __init__(self, config: ScorerConfig, processes: int = 1, threads: int = 1,
                 log_level: str = "INFO", log_format: str = "auto", *,
                 deadline_s: float = SCORING_DEADLINE_S, stop_timeout_s: float = STOP_TIMEOUT_S):
        self.config = config
        self.executors = max(1, processes if self.in_process else threads)
        self._log = (log_level, log_format)
        self.deadline_s = deadline_s
        self.stop_timeout_s = stop_timeout_s
        self.pids: list[int] = []  # the scoring processes (empty in thread mode)
        self.generation = 0        # of the batches submitted now; drop_all() bumps it
        self._busy = 0             # submitted and not collected (nor dropped)
        self._stopping = False

    # ------------------------------------------------------------- the contract

    @abc.abstractmethod
    def start(self, timeout: float = START_TIMEOUT_S) -> dict:
        """Start every executor and wait until each has its model warm; the backend's description.

        Raises :class:`ModelLoadFailed` (the model's own error), :class:`ScoringStartHung`
        or :class:`ScoringProcessDied`, all :class:`ScoringStartError`.
        """

    @abc.abstractmethod
    def submit(self, values: Sequence[bytes | None], topics: str | Sequence[str], partitions: Sequence[int],
               offsets: Sequence[int]) -> ScoringFuture:
        """Score one batch (never blocks); the future's result is a :class:`ScoredBatch`."""

    @abc.abstractmethod
    def wait(self, fut: Future, timeout: float | None) -> bool:
        """Whether ``fut`` is done, waiting up to ``timeout`` seconds (None: until it is).

        Raises :class:`ScoringTimeout` once an executor has held a batch for ``deadline_s``.
        """

    @abc.abstractmethod
    def drop_all(self) -> int:
        """Cancel every batch submitted so far (never waits); how many were still pending."""

    @abc.abstractmethod
    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop the executors; ``cancel`` drops queued batches. A running batch may finish
        within ``stop_timeout_s``; an executor busy only with dropped work, still loading its
        model, or past that time is killed (a thread: abandoned), never waited for."""

    @property
    def writing(self) -> bool:
        """A task is half written into a full pipe: look at the pool again soon."""
        return False

    # ------------------------------------------------------------- shared policy

    @property
    def idle(self) -> bool:
        return self._busy < self.executors

    def collected(self) -> None:
        """The orchestrator took one result (keeps `idle` exact without a lock)."""
        if self._busy > 0:
            self._busy -= 1

    def _bump_generation(self) -> None:
        self.generation += 1
        self._busy = 0  # every batch not collected is dropped

    def _timeout(self, what: str) -> ScoringTimeout:
        return ScoringTimeout(f"{what} did not answer within {self.deadline_s:g}s (SCORING_DEADLINE_S): "
                              "its backend hangs")

    @staticmethod
    def _next_wait(deadline: float | None, hang_at: float | None, now: float) -> float | None:
        """Seconds to sleep: to the caller's deadline or the next hang check, whichever first."""
        if hang_at is None:
            return None if deadline is None else deadline - now
        if deadline is None:
            return hang_at - now
        return min(deadline, hang_at) - now
