"""A scoring executor that hangs (a backend that never returns, a process stopped halfway through
writing a result, a model that never finishes loading) cannot block the orchestrator: every
pool call ends within a named deadline, with a typed error the worker maps to its exit code."""

from __future__ import annotations

import os
import select
import signal
import time
from concurrent.futures import BrokenExecutor
from pathlib import Path

import pytest

from tests.backends_hang import CALLS_ENV, LOAD_ENV
from workers import telemetry
from workers.inference.pool import (
    ModelLoadFailed,
    ScoringPool,
    ScoringProcessDied,
    ScoringStartError,
    ScoringStartHung,
    ScoringTimeout,
)
from workers.scoring import ScorerConfig

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "flow_classifier"
HANGS = ScorerConfig(MODEL, backend="tests.backends_hang:HangOnnxRuntime")
MODES = [pytest.param(1, id="process"), pytest.param(0, id="thread")]


def _batch(size: int = 10):
    return [v for _, v, _ in telemetry.generate(kind="flow", count=size, seed=9, bad_fraction=0.0)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


@pytest.mark.parametrize("processes", MODES)
def test_a_hung_backend_makes_wait_raise_scoring_timeout_within_the_deadline(processes, tmp_path, monkeypatch):
    monkeypatch.setenv(CALLS_ENV, str(tmp_path / "calls"))
    pool = ScoringPool(HANGS, processes=processes, threads=1, deadline_s=1.5)
    try:
        pool.start(timeout=120)
        batch = _batch()
        fut = pool.submit(batch, "flows", [0] * 10, list(range(10)))
        queued = pool.submit(batch, "flows", [0] * 10, list(range(10)))
        t0 = time.monotonic()
        # As the orchestrator polls: short waits, then one without a limit of its own.
        assert not pool.wait(fut, 0.2)
        with pytest.raises(ScoringTimeout, match=r"did not answer within 1.5s \(SCORING_DEADLINE_S\)"):
            pool.wait(fut, None)
        took = time.monotonic() - t0
        assert 1.0 <= took < 1.5 + 3.0, took
        assert (tmp_path / "calls").exists(), "the backend never began the batch"
        # The pool is broken: everything pending fails at once, as does anything submitted later,
        # all as BrokenExecutor (the pipeline's "stop, exit 70" path).
        t0 = time.monotonic()
        for f in (fut, queued, pool.submit(batch, "flows", [0] * 10, list(range(10)))):
            with pytest.raises(ScoringTimeout):
                f.result()
        assert isinstance(ScoringTimeout("x"), BrokenExecutor)
        assert time.monotonic() - t0 < 0.5
        if processes:
            deadline = time.monotonic() + 5
            while _alive(pool.pids[0]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(pool.pids[0]), "the hung scoring process was not killed"
    finally:
        t0 = time.monotonic()
        pool.shutdown(wait=True, cancel=True)
        assert time.monotonic() - t0 < 5.0


def test_a_scoring_process_stopped_halfway_through_a_result_does_not_stall_the_orchestrator():
    # 20000 events: a result of about 5 MB, far more than the 1 MiB results pipe, so the
    # scoring process is still writing it when it is stopped.
    pool = ScoringPool(ScorerConfig(MODEL, warmup_batch_sizes=(1,)), processes=1, deadline_s=5.0)
    try:
        pool.start(timeout=120)
        batch = _batch(20000)
        fut = pool.submit(batch, "flows", [0] * len(batch), list(range(len(batch))))
        # Feed the 6 MB task through the transport without reading any result, then stop the
        # process as soon as its result starts to arrive: at most one pipeful (1 MiB) can be in.
        proc = pool._procs[0]
        deadline = time.monotonic() + 30
        while proc.out:
            assert time.monotonic() < deadline
            proc.write()
            select.select([], [proc.task_fd], [], 0.05)
        assert select.select([proc.result_fd], [], [], 30)[0], "no result began to arrive"
        os.kill(pool.pids[0], signal.SIGSTOP)
        t0 = time.monotonic()
        assert not pool.wait(fut, 0.3)
        assert not fut.done()
        assert time.monotonic() - t0 < 1.5, "a half-arrived result blocked the orchestrator"
        with pytest.raises(ScoringTimeout):
            pool.wait(fut, None)
        assert time.monotonic() - t0 < 5.0 + 3.0
    finally:
        try:
            os.kill(pool.pids[0], signal.SIGCONT)
        except (ProcessLookupError, IndexError):
            pass
        pool.shutdown(wait=True, cancel=True)


@pytest.mark.parametrize("processes", MODES)
def test_a_model_that_cannot_load_is_a_model_load_failure(processes):
    pool = ScoringPool(ScorerConfig(MODEL, backend="no-such-backend"), processes=processes)
    with pytest.raises(ModelLoadFailed, match="unknown inference backend 'no-such-backend'") as err:
        pool.start(timeout=120)
    assert isinstance(err.value, ScoringStartError)  # what workers/cli.py catches
    pool.shutdown(wait=True, cancel=True)


@pytest.mark.parametrize("processes", MODES)
def test_a_model_that_never_finishes_loading_is_a_start_hang_not_a_model_error(processes, monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "hang")
    pool = ScoringPool(ScorerConfig(MODEL, backend="tests.backends_hang:HangOnLoad"), processes=processes)
    t0 = time.monotonic()
    with pytest.raises(ScoringStartHung, match=r"within 2s$"):
        pool.start(timeout=2)
    pool.shutdown(wait=True, cancel=True)  # kills the process still loading; abandons the thread
    assert time.monotonic() - t0 < 2 + 5.0


def test_a_scoring_process_that_dies_while_loading_is_reported_as_died(monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "exit")
    pool = ScoringPool(ScorerConfig(MODEL, backend="tests.backends_hang:HangOnLoad"), processes=1)
    with pytest.raises(ScoringProcessDied, match="exited with code 3"):
        pool.start(timeout=120)
    pool.shutdown(wait=True, cancel=True)


@pytest.mark.parametrize("processes", MODES)
def test_a_batch_dropped_while_its_backend_hangs_still_ends_in_scoring_timeout(processes, tmp_path, monkeypatch):
    """An abort or revoke drops in-flight work without waiting; the hung backend holding the
    dropped batch must still be caught by the deadline, or the worker would stop scoring with
    its partitions held and /healthz green (found in review: thread mode skipped it)."""
    monkeypatch.setenv(CALLS_ENV, str(tmp_path / "calls"))
    pool = ScoringPool(HANGS, processes=processes, threads=1, deadline_s=1.5)
    try:
        pool.start(timeout=120)
        batch = _batch()
        pool.submit(batch, "flows", [0] * 10, list(range(10)))
        deadline = time.monotonic() + 30
        while not (tmp_path / "calls").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # until the backend holds the batch
        pool.drop_all()
        after = pool.submit(batch, "flows", [0] * 10, list(range(10)))
        t0 = time.monotonic()
        with pytest.raises(ScoringTimeout):
            pool.wait(after, None)
        assert time.monotonic() - t0 < 1.5 + 3.0
    finally:
        pool.shutdown(wait=True, cancel=True)
