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
records back) and a second copy of the model. ``inference.processes = 0``
scores on ``inference.threads`` threads inside the worker process instead (one
process to watch; slower on a busy CPU).

How a batch travels (process mode). Each scoring process has two pipes of its
own, tasks in and results out, and the orchestrator thread works both ends
itself, with no helper thread:

1. ``submit`` pickles the batch and writes it to the task pipe without
   blocking; what the pipe cannot take yet stays in a buffer and is written
   whenever the orchestrator looks at the pool again (:meth:`ScoringPool.wait`).
2. The scoring process reads a batch, scores it and writes the result back
   (it blocks only if the orchestrator is that far behind reading).
3. :meth:`ScoringPool.wait` reads every result that has arrived and completes
   its future; asked to block, it sleeps on the pipes themselves.

Measured reasons (ad-hoc scripts on the 2-vCPU dev VM, 2048 flow events, about
620 KB pickled each way): through the default 64 KiB pipes a round trip cost
1.5 ms and 0.5-0.8 ms of CPU per side in wake-ups, against 0.34 ms and 0.2 ms
through 1 MiB pipes (:data:`PIPE_BYTES`). ``ProcessPoolExecutor`` (used
before) passes batches through two helper threads of the worker process, each
of which must win the GIL from a busy orchestrator; its round trip grew from
8 ms idle to 68 ms under load.

Scoring processes are started with ``spawn`` (never ``fork``: the worker has
librdkafka and metrics threads by then), ignore SIGINT/SIGTERM (the
orchestrator decides when to drain; a Ctrl-C reaches the whole process group),
and exit by themselves when the worker process is gone (its pipe ends close;
a watchdog covers a process busy in a long batch), so a killed replica never
leaves scoring processes behind. A scoring process that dies breaks the pool:
every pending future raises ``BrokenProcessPool`` and the worker stops (exit
70) with the open transaction aborted.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import multiprocessing
import os
import pickle
import select
import signal
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from typing import Sequence

from workers.scoring import BatchScorer, ScoredBatch, ScorerConfig

log = logging.getLogger(__name__)

# Loading and warming a model in every executor: a TensorRT engine build can take minutes.
START_TIMEOUT_S = 600.0
# How often a scoring process checks that the worker process still exists (bounds how long
# an orphan of a SIGKILLed worker keeps its model in memory while it is busy in a batch).
ORPHAN_CHECK_S = 0.5
# Cyclic-GC generation-0 threshold in scoring processes (see pipeline.GC_GEN0_THRESHOLD).
GC_GEN0_THRESHOLD = 50_000
# Pipe buffer asked for (Linux; Linux's default pipe-max-size for unprivileged processes).
# A whole batch then fits in one pipe, so neither side wakes the other every 64 KiB.
PIPE_BYTES = 1 << 20
# Tasks a scoring process holds at most (the one it scores and the next, already in its pipe, so
# it never waits for the orchestrator between batches); later ones wait in the orchestrator.
TASKS_AHEAD = 2
# At shutdown: how long a scoring process may take to finish its batch and exit before it is
# killed (a batch of a slow model; a hung backend must not hang the worker's exit).
STOP_TIMEOUT_S = 30.0


class ScoringStartError(RuntimeError):
    """An executor could not load or warm the model (the message says why)."""


# ------------------------------------------------------------------ thread mode

# Per thread: its scorer (thread mode only; a scoring process keeps its scorer in _serve).
_local = threading.local()


def _init_thread(config: ScorerConfig, started: threading.Barrier, made: list) -> None:
    """Runs once in every scoring thread; never raises (errors surface in tasks)."""
    _local.started = started
    try:
        _local.scorer = BatchScorer(config)
        _local.error = None
        made.append(_local.scorer)
    except Exception as exc:  # noqa: BLE001 - reported by the first task, with its message
        _local.scorer = None
        _local.error = f"{type(exc).__name__}: {exc}"


def _thread_scorer() -> BatchScorer:
    scorer = getattr(_local, "scorer", None)
    if scorer is None:
        raise ScoringStartError(getattr(_local, "error", None) or "scoring executor not initialised")
    return scorer


def _thread_hello(timeout: float) -> dict:
    # Every thread must answer one hello: each waits for all the others, so no thread can
    # answer two and the pool knows that every model loaded.
    _local.started.wait(timeout)
    return _thread_scorer().describe()


def _thread_score(values, topics, partitions, offsets, submitted_at) -> ScoredBatch:
    return _thread_scorer().score(values, topics, partitions, offsets, submitted_at)


# ------------------------------------------------------------ a scoring process

def _serve(tasks: Connection, results: Connection, config: ScorerConfig, log_level: str, log_format: str) -> None:
    """A scoring process: load the model, say hello, score batches until told to stop.

    Messages are pickled tuples: ``("hello", pid, description)`` or ``("error", reason)``
    once, then ``("ok", ScoredBatch)`` or ``("raised", exception)`` per batch, in the order
    the batches came. An empty task (or the worker's end closing) means stop.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from workers import logs

    logs.setup(log_level, log_format)
    _watch_parent(os.getppid())
    try:
        scorer = BatchScorer(config)
    except Exception as exc:  # noqa: BLE001 - the reason travels to the worker, which fails its start
        _send(results, ("error", f"{type(exc).__name__}: {exc}"))
        return
    try:
        if not _send(results, ("hello", os.getpid(), scorer.describe())):
            return
        # The model and modules live as long as the process: keep them out of collections.
        gc.collect()
        gc.freeze()
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
        while True:
            try:
                task = tasks.recv_bytes()
            except (EOFError, OSError):
                return  # the worker is gone
            if not task:
                return
            try:
                out = ("ok", scorer.score(*pickle.loads(task)))
            except Exception as exc:  # noqa: BLE001 - the worker decides (it stops, exit 70)
                out = ("raised", exc)
            if not _send(results, out):
                return
    finally:
        scorer.close()


def _send(conn: Connection, message: tuple) -> bool:
    """Write one message to the worker; False once the worker's end is gone."""
    try:
        payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        if message[0] == "raised":
            # Some exceptions pickle but do not unpickle (an __init__ with other arguments):
            # the worker must still learn what failed.
            pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - e.g. an exception carrying an unpicklable value
        what = message[1] if message[0] == "raised" else exc
        payload = pickle.dumps(("raised", RuntimeError(f"{type(what).__name__}: {what}")))
    try:
        conn.send_bytes(payload)
    except OSError:  # BrokenPipeError: the worker is gone
        return False
    return True


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(ORPHAN_CHECK_S)
        os._exit(0)  # the worker is gone; its transaction is aborted by the broker

    threading.Thread(target=watch, name="sluice-orphan-check", daemon=True).start()


def _frame(payload: bytes) -> bytes:
    """``payload`` framed as ``multiprocessing.connection.Connection.recv_bytes`` reads it."""
    n = len(payload)
    return (struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)) + payload


# An empty task: the scoring process stops after the tasks before it.
STOP_FRAME = _frame(b"")


def _enlarge(conn: Connection) -> None:
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only; elsewhere pipes keep their size
    if set_size is None:
        return
    try:
        fcntl.fcntl(conn.fileno(), set_size, PIPE_BYTES)
    except OSError as exc:  # e.g. a lowered fs.pipe-max-size: correct, only slower
        log.debug("could not enlarge a scoring pipe", extra={"error": str(exc)})


class _BatchFuture(Future):
    """A batch's future in process mode: waiting on it also works the pool's pipes.

    Only the orchestrator thread may wait on it (the pool is not thread-safe).
    """

    def __init__(self, pool: "ScoringPool"):
        super().__init__()
        self._pool = pool

    def result(self, timeout: float | None = None):
        self._pool.wait(self, timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None):
        self._pool.wait(self, timeout)
        return super().exception(timeout=0)


class _ScoringProcess:
    """The orchestrator's end of one scoring process."""

    def __init__(self, ctx, config: ScorerConfig, log_level: str, log_format: str):
        task_reader, self.tasks = ctx.Pipe(duplex=False)
        self.results, result_writer = ctx.Pipe(duplex=False)
        _enlarge(self.tasks)
        _enlarge(self.results)
        self.process = ctx.Process(
            target=_serve, args=(task_reader, result_writer, config, log_level, log_format),
            name="sluice-scoring", daemon=True,
        )
        self.process.start()
        # Only the child holds these now: its exit is EOF on results, EPIPE on tasks.
        task_reader.close()
        result_writer.close()
        os.set_blocking(self.tasks.fileno(), False)
        self.pid = self.process.pid
        self.out: deque[bytes] = deque()  # framed tasks not (fully) written, oldest first
        self.written = 0                  # bytes of out[0] already in the pipe
        self.begun = False                # out[0] is being written: it waits only for room
        self.waiting: deque[_BatchFuture] = deque()  # sent or buffered, unanswered, in order
        self.polled_out = False           # the pool's poller watches `tasks` for room
        self.sent = 0                     # tasks begun in the pipe and not answered yet
        self.retired = False              # stopped (or lost): its pipes are out of the poller

    def write(self) -> None:
        """Put as much of the buffered tasks into the pipe as it takes now (never blocks).

        A task is begun only while fewer than :data:`TASKS_AHEAD` are with the process, so
        the rest can still be cancelled (shutdown) and no pipe holds a backlog.
        """
        out, fd = self.out, self.tasks.fileno()
        while out:
            head = out[0]
            if not self.begun:
                if self.sent >= TASKS_AHEAD and head is not STOP_FRAME:
                    return
                self.begun = True
                self.sent += head is not STOP_FRAME
            try:
                n = os.write(fd, memoryview(head)[self.written:])
            except BlockingIOError:
                return
            self.written += n
            if self.written == len(head):
                out.popleft()
                self.written = 0
                self.begun = False

    def died(self) -> str:
        self.process.join(0.5)
        code = self.process.exitcode
        how = "is still running" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
        return f"scoring process {self.pid} {how}"

    def close(self) -> None:
        for conn in (self.tasks, self.results):
            try:
                conn.close()
            except OSError:
                pass


# ------------------------------------------------------------------- the pool

class ScoringPool:
    """``processes`` scoring processes, or (``processes=0``) ``threads`` scoring threads.

    Only the orchestrator thread uses a pool: submit, wait, collect, shut down.
    """

    def __init__(self, config: ScorerConfig, processes: int = 1, threads: int = 1,
                 log_level: str = "INFO", log_format: str = "auto"):
        self.config = config
        self.in_process = processes > 0
        self.executors = max(1, processes if self.in_process else threads)
        self._log = (log_level, log_format)
        self._busy = 0
        self.pids: list[int] = []  # the scoring processes (empty in thread mode)
        self._procs: list[_ScoringProcess] = []
        self._broken: str | None = None
        self._poller = select.poll() if self.in_process else None
        self._by_results: dict[int, _ScoringProcess] = {}
        self._stopping = False
        self._scorers: list[BatchScorer] = []  # thread mode only
        self._executor: ThreadPoolExecutor | None = None
        if not self.in_process:
            self._executor = ThreadPoolExecutor(
                max_workers=self.executors, thread_name_prefix="sluice-score", initializer=_init_thread,
                initargs=(config, threading.Barrier(self.executors), self._scorers),
            )

    def start(self, timeout: float = START_TIMEOUT_S) -> dict:
        """Start every executor and wait until each has its model warm; the backend's description.

        Raises :class:`ScoringStartError` naming what failed (unknown backend, no GPU, ...).
        """
        if not self.in_process:
            return self._start_threads(timeout)
        deadline = time.monotonic() + timeout
        ctx = multiprocessing.get_context("spawn")
        described: dict = {}
        for _ in range(self.executors):
            self._procs.append(_ScoringProcess(ctx, self.config, *self._log))
        for proc in self._procs:  # all load their models at once
            if not proc.results.poll(max(0.0, deadline - time.monotonic())):
                raise ScoringStartError(f"the model was not loaded and warm within {timeout:.0f}s")
            try:
                message = pickle.loads(proc.results.recv_bytes())
            except (EOFError, OSError):
                raise ScoringStartError(f"a scoring executor failed to start: {proc.died()}; see its log above") from None
            if message[0] == "error":
                raise ScoringStartError(message[1])
            _, pid, described = message
            self.pids.append(pid)
            self._poller.register(proc.results.fileno(), select.POLLIN)
            self._by_results[proc.results.fileno()] = proc
        log.info("scoring executors ready", extra={
            "mode": "process", "executors": self.executors, "pids": self.pids, "backend": described,
        })
        return described

    def _start_threads(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        futures = [self._executor.submit(_thread_hello, timeout) for _ in range(self.executors)]
        described: dict = {}
        for fut in futures:
            try:
                described = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise ScoringStartError(f"the model was not loaded and warm within {timeout:.0f}s") from None
            except ScoringStartError:
                raise
            except threading.BrokenBarrierError:
                raise ScoringStartError(f"not every scoring executor started within {timeout:.0f}s") from None
        log.info("scoring executors ready", extra={
            "mode": "thread", "executors": self.executors, "pids": [], "backend": described,
        })
        return described

    @property
    def idle(self) -> bool:
        return self._busy < self.executors

    @property
    def writing(self) -> bool:
        """A task is half written into a full pipe: look at the pool again soon."""
        return any(p.begun for p in self._procs)

    def submit(self, values: Sequence[bytes | None], topics: str | Sequence[str], partitions: Sequence[int],
               offsets: Sequence[int]) -> Future:
        """Score one batch; the future's result is a :class:`ScoredBatch`."""
        self._busy += 1
        submitted = time.monotonic()
        if not self.in_process:
            return self._executor.submit(_thread_score, values, topics, partitions, offsets, submitted)
        fut = _BatchFuture(self)
        if self._broken is not None:
            fut.set_exception(BrokenProcessPool(self._broken))
            return fut
        proc = min(self._procs, key=lambda p: len(p.waiting))
        proc.out.append(_frame(pickle.dumps((values, topics, partitions, offsets, submitted),
                                            pickle.HIGHEST_PROTOCOL)))
        proc.waiting.append(fut)
        self._exchange()
        return fut

    def wait(self, fut: Future, timeout: float | None) -> bool:
        """Whether ``fut`` is done, waiting up to ``timeout`` seconds (None: until it is).

        In process mode this is also when tasks are written and results read.
        """
        if not self.in_process:
            if timeout is None or timeout > 0:
                futures_wait([fut], timeout)
            return fut.done()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._exchange()
            if fut.done():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._sleep(left)

    def _exchange(self) -> None:
        """Write what the task pipes take and read every result that has arrived (never blocks)."""
        if self._broken is not None or not self._write_all():
            return
        answered = False
        while True:
            events = [fd for fd, _ in self._poller.poll(0) if fd in self._by_results]
            if not events:
                break
            for fd in events:
                proc = self._by_results[fd]
                try:
                    # Readable: a message (written whole by now, or being written) or EOF.
                    data = proc.results.recv_bytes()
                except (EOFError, OSError):
                    if self._stopping and not proc.waiting and not proc.out:
                        self._retire(proc)  # it was told to stop, and did
                        continue
                    self._break(proc)
                    return
                if not proc.waiting:
                    continue
                proc.sent -= 1
                answered = True
                fut = proc.waiting.popleft()
                try:
                    kind, value = pickle.loads(data)
                except Exception as exc:  # noqa: BLE001 - this batch fails; the stream stays in step
                    kind, value = "raised", RuntimeError(f"unreadable scoring result: {type(exc).__name__}: {exc}")
                if fut.cancelled():
                    continue
                if kind == "ok":
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
        if answered:
            self._write_all()  # an answered task makes room for the next

    def _write_all(self) -> bool:
        """Each process's buffered tasks, as far as its pipe takes them; False if one is gone."""
        for proc in self._live():
            try:
                proc.write()
            except OSError:  # BrokenPipeError: the process is gone
                self._break(proc)
                return False
        return True

    def _live(self) -> list[_ScoringProcess]:
        return [p for p in self._procs if not p.retired]

    def _sleep(self, timeout: float | None) -> None:
        """Until a result arrives, a pipe has room for buffered tasks, or ``timeout``."""
        for proc in self._live():
            # Room in a pipe matters only for a task already begun (others wait for a result).
            if proc.begun != proc.polled_out:
                if proc.begun:
                    self._poller.register(proc.tasks.fileno(), select.POLLOUT)
                else:
                    self._poller.unregister(proc.tasks.fileno())
                proc.polled_out = proc.begun
        self._poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))

    def _retire(self, proc: _ScoringProcess) -> None:
        """No poll may report this process's pipes again (they may be closed and reused)."""
        for conn in (proc.results, proc.tasks):
            try:
                self._poller.unregister(conn.fileno())
            except (KeyError, OSError, ValueError):
                pass
        self._by_results = {fd: p for fd, p in self._by_results.items() if p is not proc}
        proc.polled_out = False
        proc.retired = True

    def _break(self, proc: _ScoringProcess) -> None:
        """A scoring process is gone: fail everything in flight (the worker stops, exit 70)."""
        self._broken = proc.died()
        log.error("scoring process lost" + (" during shutdown" if self._stopping else ""),
                  extra={"reason": self._broken})
        for p in self._procs:
            p.out.clear()
            p.begun, p.written, p.sent = False, 0, 0
            while p.waiting:
                fut = p.waiting.popleft()
                if not fut.cancelled():
                    fut.set_exception(BrokenProcessPool(self._broken))
            self._retire(p)

    def collected(self) -> None:
        """The orchestrator took one result (keeps `idle` exact without a lock)."""
        self._busy -= 1

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop the executors; ``cancel`` drops queued batches (a running one always finishes)."""
        if self._stopping:
            return
        if not self.in_process:
            self._stopping = True
            self._executor.shutdown(wait=wait, cancel_futures=cancel)
            if wait:
                # Free the backends (GPU buffers) only now: no thread can be running a batch on them.
                while self._scorers:
                    self._scorers.pop().close()
            return
        self._stopping = True
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._procs:
            if cancel:
                # Tasks not yet begun are dropped; one partly in the pipe must be completed.
                while len(proc.out) > (1 if proc.begun else 0):
                    proc.out.pop()
                    proc.waiting.pop().cancel()
            proc.out.append(STOP_FRAME)  # after what is already on its way
        if wait:
            # Finish what was sent, reading results so that no process blocks writing one.
            while self._broken is None and any(p.waiting or p.out for p in self._procs):
                self._exchange()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self._broken is None and any(p.waiting or p.out for p in self._procs):
                    self._sleep(min(left, 0.1))
        else:
            self._exchange()  # the stop frames, as far as the pipes take them
        for proc in self._procs:
            self._retire(proc)
            proc.close()  # a process not yet told sees EOF (or EPIPE) and exits
            if wait:
                proc.process.join(max(0.0, deadline - time.monotonic()))
                if proc.process.is_alive():  # a hung backend must not hang the worker's exit
                    log.warning("scoring process did not stop in time; killing it", extra={"pid": proc.pid})
                    proc.process.kill()
                    proc.process.join(5)
        for proc in self._procs:
            while proc.waiting:
                fut = proc.waiting.popleft()
                if not fut.cancel() and not fut.done():
                    fut.set_exception(BrokenProcessPool("the scoring pool was shut down"))
            if proc.process.exitcode is not None:
                proc.process.close()
        self._broken = self._broken or "the scoring pool was shut down"
