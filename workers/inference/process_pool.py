"""Scoring processes: the :class:`ScoringPool` of ``inference.processes >= 1``.

The orchestrator thread works every scoring process's pipes itself
(:class:`workers.inference.pipes.ScoringProcess`; no helper thread): ``submit``
buffers the task and writes what the pipe takes, ``wait`` writes and reads
whatever it can and, asked to block, sleeps on the pipes themselves. Each
process is given at most :data:`~workers.inference.pipes.TASKS_AHEAD` tasks;
later ones wait here, where ``drop_all`` and ``shutdown(cancel=True)`` can still
take them back.

Nothing here waits on a scoring process without a limit: ``wait`` gives up on
an executor that has held a batch for ``deadline_s`` (it is killed and the pool
broken with :class:`ScoringTimeout`); a result is read as far as it has
arrived; ``drop_all`` does no I/O; ``shutdown`` kills what has not stopped
within ``stop_timeout_s``, and at once a process busy only with dropped work.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import select
import time
from concurrent.futures import BrokenExecutor, Future
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

from workers.inference.pipes import STOP_FRAME, ScoringProcess, task_frame
from workers.inference.pool import (
    START_TIMEOUT_S,
    ModelLoadFailed,
    ScoringFuture,
    ScoringPool,
    ScoringProcessDied,
    ScoringStartHung,
)

log = logging.getLogger("workers.inference.pool")

# With nothing to wake it (no deadline, no result due), ``wait`` still looks again this often.
IDLE_WAKE_S = 1.0


class ProcessScoringPool(ScoringPool):
    """``processes`` scoring processes (spawned), each with its own model."""

    in_process = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ctx = multiprocessing.get_context("spawn")
        # The generation scoring processes compare each task with before they begin it.
        self._shared_generation = self._ctx.RawValue("q", 0)
        self._procs: list[ScoringProcess] = []
        self._broken: BrokenExecutor | None = None
        self._poller = select.poll()
        self._by_results: dict[int, ScoringProcess] = {}

    def start(self, timeout: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        described: dict = {}
        for _ in range(self.executors):
            self._procs.append(ScoringProcess(self._ctx, self.config, *self._log, self._shared_generation))
        for proc in self._procs:  # all load their models at once
            try:
                data = proc.read_by(deadline)
            except (EOFError, OSError):
                raise ScoringProcessDied(
                    f"a scoring executor failed to start: {proc.died()}; see its log above") from None
            if data is None:
                raise ScoringStartHung(f"the model was not loaded and warm within {timeout:.0f}s")
            message = pickle.loads(data)
            if message[0] == "error":
                raise ModelLoadFailed(message[1])
            _, pid, described = message
            proc.ready = True
            self.pids.append(pid)
            self._poller.register(proc.result_fd, select.POLLIN)
            self._by_results[proc.result_fd] = proc
        log.info("scoring executors ready", extra={
            "mode": "process", "executors": self.executors, "pids": self.pids, "backend": described,
        })
        return described

    @property
    def writing(self) -> bool:
        return any(p.begun for p in self._procs)

    def submit(self, values: Sequence[bytes | None], topics: str | Sequence[str], partitions: Sequence[int],
               offsets: Sequence[int]) -> ScoringFuture:
        self._busy += 1
        fut = ScoringFuture(self, self.generation)
        if self._broken is not None:
            fut.set_exception(self._broken_again())
            return fut
        procs = self._procs
        proc = procs[0] if len(procs) == 1 else min(procs, key=lambda p: len(p.waiting))
        proc.out.append(task_frame(self.generation, pickle.dumps(
            (values, topics, partitions, offsets, time.monotonic()), pickle.HIGHEST_PROTOCOL)))
        proc.waiting.append(fut)
        self._exchange()
        return fut

    def wait(self, fut: Future, timeout: float | None) -> bool:
        """In process mode this is also when tasks are written and results read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._exchange()
            if fut.done() or self._broken is not None:
                return fut.done()
            now = time.monotonic()
            hang_at = self._check_hung(now)
            if deadline is not None and now >= deadline:
                return False
            left = self._next_wait(deadline, hang_at, now)
            self._sleep(IDLE_WAKE_S if left is None else min(left, IDLE_WAKE_S))

    def drop_all(self) -> int:
        self._bump_generation()
        self._shared_generation.value = self.generation  # tasks in a pipe are skipped, not scored
        dropped = 0
        for proc in self._procs:
            for fut in proc.drop_buffered():  # never written: never scored
                dropped += fut.cancel()
            for fut in proc.waiting:  # with the process: its answer is thrown away on arrival
                if not fut.done():
                    dropped += fut.cancel()
        return dropped

    # ------------------------------------------------------------ the pipes

    def _exchange(self) -> None:
        """Write what the task pipes take and read every result that has arrived (never blocks)."""
        if self._broken is not None or not self._write_all():
            return
        answered = False
        by_results, generation = self._by_results, self.generation
        while True:
            progressed = False
            for fd, _ in self._poller.poll(0):
                proc = by_results.get(fd)
                if proc is None:
                    continue
                while True:
                    try:
                        data = proc.read()
                    except (EOFError, OSError):
                        if self._stopping and not proc.out and all(f.done() for f in proc.waiting):
                            self._retire(proc)  # it was told to stop, and did
                            break
                        reason = proc.died()
                        log.error("scoring process lost" + (" during shutdown" if self._stopping else ""),
                                  extra={"reason": reason})
                        self._break(BrokenProcessPool(reason))
                        return
                    if data is None:
                        break  # nothing more, or a result still arriving
                    progressed = True
                    if not proc.waiting:
                        continue
                    proc.sent -= 1
                    if proc.sent:
                        proc.since = time.monotonic()  # it answered: its hang clock starts again
                    answered = True
                    fut = proc.waiting.popleft()
                    if fut.generation != generation or fut.done():
                        continue  # dropped: thrown away on arrival
                    try:
                        kind, value = pickle.loads(data)
                    except Exception as exc:  # noqa: BLE001 - this batch fails; the stream stays in step
                        kind, value = "raised", RuntimeError(
                            f"unreadable scoring result: {type(exc).__name__}: {exc}")
                    if kind == "ok":
                        fut.set_result(value)
                    elif kind == "raised":
                        fut.set_exception(value)
                    else:
                        fut.cancel()
            if not progressed:
                break
        if answered:
            self._write_all()  # an answered task makes room for the next

    def _write_all(self) -> bool:
        """Each process's buffered tasks, as far as its pipe takes them; False if one is gone."""
        for proc in self._procs:
            if proc.retired:
                continue
            try:
                proc.write()
            except OSError:  # BrokenPipeError: the process is gone
                reason = proc.died()
                log.error("scoring process lost", extra={"reason": reason})
                self._break(BrokenProcessPool(reason))
                return False
        return True

    def _check_hung(self, now: float) -> float | None:
        """Raise ScoringTimeout for a process that held a batch too long; else the next such moment."""
        hang_at = None
        for proc in self._procs:
            if proc.sent and not proc.retired:
                at = proc.since + self.deadline_s
                if now >= at:
                    exc = self._timeout(f"scoring process {proc.pid}")
                    log.error("scoring process hung; killing it",
                              extra={"pid": proc.pid, "deadline_s": self.deadline_s})
                    proc.kill()
                    self._break(exc)
                    raise self._broken_again()
                if hang_at is None or at < hang_at:
                    hang_at = at
        return hang_at

    def _sleep(self, timeout: float) -> None:
        """Until a result arrives, a pipe has room for a task begun, or ``timeout``."""
        for proc in self._procs:
            if proc.retired:
                continue
            # Room in a pipe matters only for a task already begun (others wait for a result).
            if proc.begun != proc.polled_out:
                if proc.begun:
                    self._poller.register(proc.task_fd, select.POLLOUT)
                else:
                    self._poller.unregister(proc.task_fd)
                proc.polled_out = proc.begun
        self._poller.poll(max(0, int(timeout * 1000) + 1))

    def _retire(self, proc: ScoringProcess) -> None:
        """No poll may report this process's pipes again (they may be closed and reused)."""
        for fd in (proc.result_fd, proc.task_fd):
            try:
                self._poller.unregister(fd)
            except (KeyError, OSError, ValueError):
                pass
        self._by_results.pop(proc.result_fd, None)
        proc.polled_out = False
        proc.retired = True

    def _break(self, exc: BrokenExecutor) -> None:
        """A scoring process is gone or hung: fail everything in flight (the worker stops, exit 70)."""
        self._broken = exc
        for p in self._procs:
            p.out.clear()
            p.begun, p.written, p.sent = False, 0, 0
            while p.waiting:
                fut = p.waiting.popleft()
                if not fut.done():
                    fut.set_exception(self._broken_again())
            self._retire(p)

    def _broken_again(self) -> BrokenExecutor:
        return type(self._broken)(*self._broken.args)

    # ------------------------------------------------------------ shutdown

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        if self._stopping:
            return
        self._stopping = True
        deadline = time.monotonic() + self.stop_timeout_s
        for proc in self._procs:
            if proc.retired:
                continue
            if cancel:
                for fut in proc.drop_buffered():  # never written: never scored
                    fut.cancel()
            proc.out.append(STOP_FRAME)  # after what is already on its way
        if wait:
            # Finish what was sent and is still wanted, reading results so that no process
            # blocks writing one.
            while self._broken is None:
                self._exchange()
                if self._broken is not None or not any(_owes(p) for p in self._procs):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._sleep(min(left, 0.1))
        else:
            self._exchange()  # the stop frames, as far as the pipes take them
        for proc in self._procs:
            stale_only = proc.sent > 0 and not _owes(proc)
            self._retire(proc)
            proc.close()  # a process not yet told sees EOF (or EPIPE) and exits
            if not wait:
                continue
            if not proc.ready or stale_only:
                proc.kill()  # loading a model, hung, or scoring work nobody wants: nothing to wait for
                continue
            proc.process.join(max(0.0, deadline - time.monotonic()))
            if proc.process.is_alive():  # a hung backend must not hang the worker's exit
                log.warning("scoring process did not stop in time; killing it", extra={"pid": proc.pid})
                proc.kill()
        for proc in self._procs:
            while proc.waiting:
                fut = proc.waiting.popleft()
                if not fut.cancel() and not fut.done():
                    fut.set_exception(BrokenProcessPool("the scoring pool was shut down"))
            if proc.process.exitcode is not None:
                proc.process.close()
        if self._broken is None:
            self._broken = BrokenProcessPool("the scoring pool was shut down")


def _owes(proc: ScoringProcess) -> bool:
    """The process holds a batch somebody still wants."""
    return not proc.retired and any(not f.done() for f in proc.waiting)
