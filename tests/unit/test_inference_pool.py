"""Scoring pool: processes score as the worker process would, fail clearly, and leave no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import BrokenExecutor
from pathlib import Path

import orjson
import pytest

from workers import telemetry
from workers.inference.pool import ScoringPool, ScoringStartError
from workers.scoring import BatchScorer, ScorerConfig

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "flow_classifier"
CONFIG = ScorerConfig(MODEL, warmup_batch_sizes=(1, 64))


def _batches(n_batches: int, size: int, bad_fraction: float = 0.05):
    events = [v for _, v, _ in telemetry.generate(kind="flow", count=n_batches * size, seed=5, bad_fraction=bad_fraction)]
    return [events[i * size:(i + 1) * size] for i in range(n_batches)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def _signals_taken(pid: int) -> bool:
    """No signal sent to the process is still pending: each was ignored, handled or has killed it
    (/proc/<pid>/status ShdPnd, the process-directed pending set)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return next((int(line.split()[1], 16) for line in text.splitlines() if line.startswith("ShdPnd:")), 0) == 0


def _docs(records):
    docs = [orjson.loads(r) for r in records]
    for d in docs:
        d.pop("scored_at")
    return docs


@pytest.mark.parametrize("processes", [1, 2, 0])
def test_pool_scores_like_the_worker_process_in_submission_order(processes):
    batches = _batches(6, 300)
    local = BatchScorer(CONFIG)
    pool = ScoringPool(CONFIG, processes=processes, threads=2)
    try:
        pool.start(timeout=120)
        assert len(pool.pids) == processes
        futs = [pool.submit(b, "flows", [i % 3] * len(b), list(range(len(b)))) for i, b in enumerate(batches)]
        assert not pool.idle
        for i, (b, fut) in enumerate(zip(batches, futs)):
            got = fut.result(timeout=60)
            pool.collected()
            want = local.score(b, "flows", [i % 3] * len(b), list(range(len(b))))
            assert _docs(got.records) == _docs(want.records)
            assert got.positions.tolist() == want.positions.tolist()
            assert [(r.position, r.reason) for r in got.rejects] == [(r.position, r.reason) for r in want.rejects]
            assert got.rejects, "the generator's bad records must come back as rejects"
            assert (got.drift.bins == want.drift.bins).all() and got.drift.count == len(got.records)
        assert pool.idle
    finally:
        pool.shutdown()
    for pid in pool.pids:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"scoring process {pid} outlived the pool"


MODES = [pytest.param(1, id="process"), pytest.param(0, id="thread")]


@pytest.mark.parametrize("processes", MODES)
def test_a_model_that_cannot_load_fails_start_with_the_reason(processes):
    pool = ScoringPool(ScorerConfig(MODEL, backend="no-such-backend"), processes=processes)
    with pytest.raises(ScoringStartError, match="unknown inference backend 'no-such-backend'"):
        pool.start(timeout=120)
    pool.shutdown()


@pytest.mark.parametrize("processes", MODES)
def test_a_backend_named_by_import_path_loads_in_the_scoring_process(processes):
    pool = ScoringPool(ScorerConfig(MODEL, backend="tests.backends:SlowOnnxRuntime"), processes=processes)
    try:
        pool.start(timeout=120)
        out = pool.submit(_batches(1, 10, 0.0)[0], "flows", [0] * 10, list(range(10))).result(timeout=60)
        assert len(out.records) == 10 and out.infer_s >= 0.4
    finally:
        pool.shutdown()


def test_a_dead_scoring_process_breaks_the_pool_instead_of_hanging_it():
    pool = ScoringPool(ScorerConfig(MODEL, backend="tests.backends:SlowOnnxRuntime"), processes=1)
    try:
        pool.start(timeout=120)
        fut = pool.submit(_batches(1, 10, 0.0)[0], "flows", [0] * 10, list(range(10)))
        os.kill(pool.pids[0], signal.SIGKILL)
        with pytest.raises(BrokenExecutor):
            fut.result(timeout=30)
    finally:
        pool.shutdown()


def test_scoring_processes_exit_when_the_worker_is_killed(tmp_path):
    pids_file = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from workers.inference.pool import ScoringPool
        from workers.scoring import ScorerConfig
        if __name__ == "__main__":
            pool = ScoringPool(ScorerConfig(Path({str(MODEL)!r})), processes=2)
            pool.start(timeout=120)
            Path({str(pids_file)!r}).write_text(" ".join(map(str, pool.pids)))
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not pids_file.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "the worker stand-in died"
            time.sleep(0.1)
        pids = [int(p) for p in pids_file.read_text().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        for pid in pids:  # a Ctrl-C reaches the whole process group: scoring processes ignore it
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not all(_signals_taken(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_signals_taken(p) for p in pids), "the signals were never delivered"
        assert all(_alive(p) for p in pids), "a scoring process died of SIGINT; the worker decides when to stop"
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "scoring processes outlived a SIGKILLed worker"
    finally:
        proc.kill()


def test_batches_larger_than_a_pipe_queue_up_and_come_back_whole_and_in_order():
    # Each task is several MiB pickled: the orchestrator writes what the pipe takes and keeps
    # the rest, never blocking; every batch must still arrive whole, in order.
    big = b'{"event_id": "' + b"x" * (3 << 20) + b'"}'
    batches = [[big] + b for b in _batches(6, 50, 0.0)]
    pool = ScoringPool(CONFIG, processes=1)
    try:
        pool.start(timeout=120)
        t0 = time.monotonic()
        futs = [pool.submit(b, "flows", [0] * len(b), list(range(len(b)))) for b in batches]
        assert time.monotonic() - t0 < 2.0, "submit blocked on a full pipe"
        assert pool.writing, "18 MiB of tasks cannot all be in the pipe yet"
        for b, fut in zip(batches, futs):
            out = fut.result(timeout=60)
            pool.collected()
            assert [r.position for r in out.rejects] == [0]  # the oversized value, by position
            assert [orjson.loads(r)["event_id"] for r in out.records] == [orjson.loads(v)["event_id"] for v in b[1:]]
        assert not pool.writing
    finally:
        pool.shutdown()


@pytest.mark.parametrize("processes", MODES)
def test_shutdown_with_cancel_drops_queued_batches_and_finishes_the_running_one(monkeypatch, processes):
    monkeypatch.setenv("SLUICE_TEST_BACKEND_DELAY_S", "0.3")
    pool = ScoringPool(ScorerConfig(MODEL, backend="tests.backends:SlowOnnxRuntime"), processes=processes)
    pool.start(timeout=120)
    batch = _batches(1, 10, 0.0)[0]
    futs = [pool.submit(batch, "flows", [0] * 10, list(range(10))) for _ in range(5)]
    time.sleep(0.1)  # the first is running
    t0 = time.monotonic()
    pool.shutdown(wait=True, cancel=True)
    # What was already in the pipe is scored; nothing queued past it is.
    assert time.monotonic() - t0 < 5 * 0.3
    assert futs[0].done() and not futs[0].cancelled() and len(futs[0].result().records) == 10
    assert any(f.cancelled() for f in futs)
    assert all(_alive(pid) is False for pid in pool.pids)


def test_an_idle_scoring_process_that_dies_fails_the_next_batch_at_once():
    pool = ScoringPool(CONFIG, processes=2)
    try:
        pool.start(timeout=120)
        os.kill(pool.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pool.pids[1]) and time.monotonic() < deadline:  # dead before anything is submitted
            time.sleep(0.02)
        batch = _batches(1, 10, 0.0)[0]
        futs = [pool.submit(batch, "flows", [0] * 10, list(range(10))) for _ in range(2)]
        with pytest.raises(BrokenExecutor, match=f"scoring process {pool.pids[1]} was killed by signal 9"):
            for fut in futs:
                fut.result(timeout=10)
        with pytest.raises(BrokenExecutor):  # and every batch after it
            pool.submit(batch, "flows", [0] * 10, list(range(10))).result(timeout=1)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("processes", [pytest.param(2, id="process"), pytest.param(0, id="thread")])
def test_shutdown_lets_a_running_batch_finish_while_an_idle_process_stops(monkeypatch, processes):
    monkeypatch.setenv("SLUICE_TEST_BACKEND_DELAY_S", "0.5")
    pool = ScoringPool(ScorerConfig(MODEL, backend="tests.backends:SlowOnnxRuntime"), processes=processes,
                       threads=2)
    pool.start(timeout=120)
    fut = pool.submit(_batches(1, 10, 0.0)[0], "flows", [0] * 10, list(range(10)))
    time.sleep(0.1)
    pool.shutdown(wait=True)  # the idle process exits first; that is no loss
    assert len(fut.result(timeout=0).records) == 10
    with pytest.raises(BrokenExecutor, match="shut down"):
        pool.submit([b"{}"], "flows", [0], [0]).result(timeout=1)


class _TwoArgError(Exception):
    def __init__(self, code, text):
        super().__init__(f"{code}: {text}")


def test_an_exception_that_cannot_be_unpickled_still_reaches_the_worker_as_text():
    from multiprocessing import Pipe
    import pickle

    from workers.inference.pipes import send as _send

    reader, writer = Pipe(duplex=False)
    assert _send(writer, ("raised", _TwoArgError(7, "backend on fire")))
    kind, exc = pickle.loads(reader.recv_bytes())
    assert kind == "raised" and isinstance(exc, RuntimeError) and str(exc) == "_TwoArgError: 7: backend on fire"
