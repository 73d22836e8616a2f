"""The pipe transport between the orchestrator and one scoring process.

Each scoring process has two pipes of its own, tasks in and results out, and the
orchestrator thread works both ends itself, with no helper thread
(:class:`workers.inference.process_pool.ProcessScoringPool` decides what to send
and when; this module only moves bytes and never blocks the orchestrator):

1. A task is framed as ``multiprocessing.connection.Connection.recv_bytes``
   reads it (the scoring process reads its pipe with ``recv_bytes``) and written
   without blocking: what the pipe cannot take yet stays in a buffer
   (:meth:`ScoringProcess.write`) and is written when the orchestrator looks at
   the pool again.
2. The scoring process (:func:`serve`) reads a task, scores it and writes the
   result back (it blocks only if the orchestrator is that far behind reading).
3. :meth:`ScoringProcess.read` takes whatever part of a result has arrived and
   returns the result once it is whole, also without blocking: a scoring process
   stopped (SIGSTOP, a debugger, a swapped-out page) halfway through writing a
   result cannot stall the orchestrator.

Every task carries the pool's generation (8 bytes before its pickle). The pool
publishes its current generation in shared memory; a scoring process that
reads a task older than that answers ``("dropped", None)`` without scoring it,
so work dropped by an abort or a revoke costs no inference once it is out of
the orchestrator's hands (short of the batch already being scored).

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
leaves scoring processes behind.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import pickle
import select
import signal
import struct
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from workers import profiling
from workers.scoring import BatchScorer, ScorerConfig

log = logging.getLogger(__name__)

# How often a scoring process checks that the worker process still exists (bounds how long
# an orphan of a SIGKILLed worker keeps its model in memory while it is busy in a batch).
ORPHAN_CHECK_S = 0.5
# Cyclic-GC generation-0 threshold in scoring processes (see pipeline.GC_GEN0_THRESHOLD).
GC_GEN0_THRESHOLD = 50_000
# Pipe buffer asked for (Linux; Linux's default pipe-max-size for unprivileged processes).
# A whole batch then fits in one pipe, so neither side wakes the other every 64 KiB.
PIPE_BYTES = 1 << 20
# Tasks a scoring process holds at most (the one it scores and the next, already in its pipe, so
# it never waits for the orchestrator between batches); later ones wait in the orchestrator,
# where they can still be cancelled.
TASKS_AHEAD = 2

_GEN = struct.Struct("!q")


# ------------------------------------------------------------ framing

def frame(payload: bytes) -> bytes:
    """``payload`` framed as ``multiprocessing.connection.Connection.recv_bytes`` reads it."""
    n = len(payload)
    return (struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)) + payload


def task_frame(generation: int, pickled: bytes) -> bytes:
    """A task: its generation, then the pickled arguments, framed in one copy."""
    n = len(pickled) + _GEN.size
    head = struct.pack("!iq", n, generation) if n <= 0x7FFFFFFF else struct.pack("!iQq", -1, n, generation)
    return head + pickled


# An empty task: the scoring process stops after the tasks before it.
STOP_FRAME = frame(b"")


# ------------------------------------------------------------ a scoring process

def serve(tasks: Connection, results: Connection, config: ScorerConfig, log_level: str, log_format: str,
          generation: Any) -> None:
    """A scoring process: load the model, say hello, score batches until told to stop.

    Messages are pickled tuples: ``("hello", pid, description)`` or ``("error", reason)``
    once, then per task, in the order the tasks came, ``("ok", ScoredBatch)``,
    ``("raised", exception)`` or ``("dropped", None)`` (the task's generation is older
    than ``generation.value``: it was dropped before it began). An empty task (or the
    worker's end closing) means stop.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from workers import logs

    logs.setup(log_level, log_format)
    _watch_parent(os.getppid())
    # NVTX on CUDA; a sampling profile when the worker runs with --profile (SLUICE_PROFILE_DIR
    # in the environment this process inherited), written when this function returns.
    profile = profiling.start_scoring_process(config.device)
    try:
        scorer = BatchScorer(config)
    except Exception as exc:  # noqa: BLE001 - the reason travels to the worker, which fails its start
        send(results, ("error", f"{type(exc).__name__}: {exc}"))
        profiling.finish(profile)
        return
    try:
        if not send(results, ("hello", os.getpid(), scorer.describe())):
            return
        # The model and modules live as long as the process: keep them out of collections.
        gc.collect()
        gc.freeze()
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
        unpack = _GEN.unpack_from
        while True:
            try:
                task = tasks.recv_bytes()
            except (EOFError, OSError):
                return  # the worker is gone
            if not task:
                return
            if unpack(task)[0] < generation.value:
                out: tuple = ("dropped", None)
            else:
                try:
                    out = ("ok", scorer.score(*pickle.loads(memoryview(task)[_GEN.size:])))
                except Exception as exc:  # noqa: BLE001 - the worker decides (it stops, exit 70)
                    out = ("raised", exc)
            del task
            if not send(results, out):
                return
    finally:
        scorer.close()
        profiling.finish(profile)


def send(conn: Connection, message: tuple) -> bool:
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


def _enlarge(conn: Connection) -> None:
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only; elsewhere pipes keep their size
    if set_size is None:
        return
    try:
        fcntl.fcntl(conn.fileno(), set_size, PIPE_BYTES)
    except OSError as exc:  # e.g. a lowered fs.pipe-max-size: correct, only slower
        log.debug("could not enlarge a scoring pipe", extra={"error": str(exc)})


# ------------------------------------------------------------ the orchestrator's end

class FrameReader:
    """Reads ``Connection.send_bytes`` frames from a non-blocking pipe, never blocking: a frame
    still arriving is kept in pieces until it is whole.

    The common case, a frame already whole in the pipe, costs two reads and no copy beyond
    the kernel's.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.progressed = False         # the last read() took part of a frame, not all of it
        self._head = bytearray()        # a frame's header, as far as it has arrived
        self._need = -1                 # bytes of the frame under way still to come (-1: none under way)
        self._chunks: list[bytes] = []  # what has arrived of it

    def read(self) -> bytes | None:
        """One whole frame's payload if it has arrived, else None. ``EOFError``: the writer's end closed."""
        fd = self.fd
        got = False  # bytes came in this call
        if self._need < 0:  # between frames: the next one's header
            head = self._head
            while True:
                want = (4 if len(head) < 4 else 12) - len(head)
                try:
                    chunk = os.read(fd, want)
                except BlockingIOError:
                    self.progressed = got
                    return None
                if not chunk:
                    raise EOFError
                got = True
                head += chunk
                if len(head) < 4:
                    continue
                n = struct.unpack_from("!i", head)[0]
                if n == -1:
                    if len(head) < 12:
                        continue
                    n = struct.unpack_from("!Q", head, 4)[0]
                break
            head.clear()
            self._need = n
        chunks = self._chunks
        while self._need:
            try:
                chunk = os.read(fd, self._need)
            except BlockingIOError:
                self.progressed = got
                return None
            if not chunk:
                raise EOFError
            got = True
            chunks.append(chunk)
            self._need -= len(chunk)
        self._need = -1
        self.progressed = False
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return data


class ScoringProcess:
    """The orchestrator's end of one scoring process: its pipes, buffers and in-order futures.

    Nothing here blocks: :meth:`write` puts into the task pipe what it takes now,
    :meth:`read` takes what has arrived of a result.
    """

    def __init__(self, ctx, config: ScorerConfig, log_level: str, log_format: str, generation: Any):
        task_reader, self.tasks = ctx.Pipe(duplex=False)
        self.results, result_writer = ctx.Pipe(duplex=False)
        _enlarge(self.tasks)
        _enlarge(self.results)
        self.process = ctx.Process(
            target=serve, args=(task_reader, result_writer, config, log_level, log_format, generation),
            name="sluice-scoring", daemon=True,
        )
        self.process.start()
        # Only the child holds these now: its exit is EOF on results, EPIPE on tasks.
        task_reader.close()
        result_writer.close()
        self.task_fd = self.tasks.fileno()
        self.result_fd = self.results.fileno()
        os.set_blocking(self.task_fd, False)
        os.set_blocking(self.result_fd, False)
        self.pid = self.process.pid
        self.ready = False                # said hello (its model is loaded and warm)
        self.out: deque[bytes] = deque()  # framed tasks not (fully) written, oldest first
        self.written = 0                  # bytes of out[0] already in the pipe
        self.begun = False                # out[0] is being written: it waits only for room
        self.waiting: deque = deque()     # futures sent or buffered, unanswered, in order
        self.polled_out = False           # the pool's poller watches `tasks` for room
        self.sent = 0                     # tasks begun in the pipe and not answered yet
        self.since = 0.0                  # monotonic: last answer (or part of one), or first task since
        self.retired = False              # stopped (or lost): its pipes are out of the poller
        self.reader = FrameReader(self.result_fd)

    def write(self) -> None:
        """Put as much of the buffered tasks into the pipe as it takes now (never blocks).

        A task is begun only while fewer than :data:`TASKS_AHEAD` are with the process, so
        the rest can still be cancelled and no pipe holds a backlog. ``OSError`` (EPIPE):
        the process is gone.
        """
        out, fd = self.out, self.task_fd
        while out:
            head = out[0]
            if not self.begun:
                if head is not STOP_FRAME:
                    if self.sent >= TASKS_AHEAD:
                        return
                    if not self.sent:
                        self.since = time.monotonic()  # the hang clock starts with its first task
                    self.sent += 1
                self.begun = True
            try:
                n = os.write(fd, memoryview(head)[self.written:])
            except BlockingIOError:
                return
            self.written += n
            if self.written == len(head):
                out.popleft()
                self.written = 0
                self.begun = False

    def drop_buffered(self) -> list:
        """Take back the tasks not begun (newest first); their futures, which the caller settles."""
        keep = 1 if self.begun else 0  # a task partly in the pipe must be completed
        dropped = []
        while len(self.out) > keep and self.out[-1] is not STOP_FRAME:
            self.out.pop()
            dropped.append(self.waiting.pop())
        return dropped

    def read(self) -> bytes | None:
        """One whole result if it has arrived (never blocks), else None. ``EOFError``: the process's end closed."""
        reader = self.reader
        data = reader.read()
        if data is None and reader.progressed:
            # Part of a result (bigger than the pipe) came: the process is alive and writing,
            # though its reader was away; its hang clock starts again.
            self.since = time.monotonic()
        return data

    def read_by(self, deadline: float) -> bytes | None:
        """One whole result, waiting for it until ``deadline`` (monotonic); None if it did not come."""
        poller = select.poll()
        poller.register(self.result_fd, select.POLLIN)
        while True:
            message = self.read()
            if message is not None:
                return message
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            poller.poll(max(1, int(left * 1000) + 1))

    def died(self) -> str:
        self.process.join(0.5)
        code = self.process.exitcode
        how = "is still running" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
        return f"scoring process {self.pid} {how}"

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(5)

    def close(self) -> None:
        for conn in (self.tasks, self.results):
            try:
                conn.close()
            except OSError:
                pass
