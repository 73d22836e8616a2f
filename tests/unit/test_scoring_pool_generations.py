"""Dropping in-flight work (abort, revoke, lost partitions) never waits for inference, never
scores what had not begun, and never hands back a stale result. Real scoring processes and
threads; the backend counts the batches it begins in a file (tests/backends_hang.py)."""

from __future__ import annotations

import time
from concurrent.futures import CancelledError
from pathlib import Path

import orjson
import pytest

from tests.backends_hang import CALLS_ENV, DELAY_ENV
from workers import telemetry
from workers.inference.pool import ScoringPool
from workers.scoring import ScorerConfig

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "flow_classifier"
COUNTING = ScorerConfig(MODEL, backend="tests.backends_hang:CountingOnnxRuntime")
MODES = [pytest.param(1, id="process"), pytest.param(0, id="thread")]


def _batch(size: int = 10):
    return [v for _, v, _ in telemetry.generate(kind="flow", count=size, seed=7, bad_fraction=0.0)]


def _calls(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _until_begun(pool, fut, calls: Path, n: int = 1, timeout: float = 30.0) -> None:
    """Work the pool until the backend has begun ``n`` batches."""
    deadline = time.monotonic() + timeout
    while _calls(calls) < n:
        assert time.monotonic() < deadline, "the backend never began the batch"
        pool.wait(fut, 0.02)


@pytest.fixture
def calls(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "calls"
    monkeypatch.setenv(CALLS_ENV, str(path))
    return path


@pytest.mark.parametrize("processes", MODES)
def test_dropping_inflight_work_returns_at_once_while_the_backend_sleeps_30s(processes, calls, monkeypatch):
    monkeypatch.setenv(DELAY_ENV, "30")
    pool = ScoringPool(COUNTING, processes=processes, threads=1)
    try:
        pool.start(timeout=120)
        batch = _batch()
        futs = [pool.submit(batch, "flows", [0] * 10, list(range(10))) for _ in range(4)]
        _until_begun(pool, futs[0], calls)
        assert not pool.idle
        t0 = time.monotonic()
        assert pool.drop_all() == 4
        assert time.monotonic() - t0 < 1.0
        assert pool.idle  # nothing the orchestrator waits for
        for fut in futs:  # a caller still holding a dropped future is not made to wait either
            with pytest.raises(CancelledError):
                fut.result()
        assert time.monotonic() - t0 < 1.0
    finally:
        t0 = time.monotonic()
        pool.shutdown(wait=True, cancel=True)
        # A process busy only with dropped work is killed, a thread abandoned: no 30 s wait.
        assert time.monotonic() - t0 < 5.0


@pytest.mark.parametrize("processes", MODES)
def test_cancelled_batches_that_had_not_begun_are_never_scored(processes, calls, monkeypatch):
    monkeypatch.setenv(DELAY_ENV, "0.5")
    pool = ScoringPool(COUNTING, processes=processes, threads=1)
    try:
        pool.start(timeout=120)
        batch = _batch()
        # One being scored, one already in the process's pipe, three buffered in the orchestrator.
        dropped = [pool.submit(batch, "flows", [0] * 10, list(range(10))) for _ in range(5)]
        _until_begun(pool, dropped[0], calls)
        pool.drop_all()
        after = [pool.submit(batch, "flows", [1] * 10, list(range(10))) for _ in range(2)]
        for fut in after:
            assert len(fut.result(timeout=60).records) == 10
            pool.collected()
        assert all(f.cancelled() for f in dropped)
        # The one running when dropped, then the two submitted after: nothing else began.
        assert _calls(calls) == 3
    finally:
        pool.shutdown(wait=True, cancel=True)


@pytest.mark.parametrize("processes", MODES)
def test_a_stale_result_arriving_after_a_generation_bump_is_not_returned(processes, calls, monkeypatch):
    monkeypatch.setenv(DELAY_ENV, "0.5")
    pool = ScoringPool(COUNTING, processes=processes, threads=1)
    try:
        pool.start(timeout=120)
        gen = pool.generation
        batch = _batch()
        stale = pool.submit(batch, "flows", [7] * 10, list(range(100, 110)))
        _until_begun(pool, stale, calls)
        pool.drop_all()
        assert pool.generation > gen
        fresh = pool.submit(batch, "flows", [3] * 10, list(range(10)))
        assert fresh.generation == pool.generation and stale.generation == gen
        out = fresh.result(timeout=60)
        pool.collected()
        # The stale batch's answer came first and was thrown away, not handed to the next future.
        docs = [orjson.loads(r) for r in out.records]
        assert {d["source"]["partition"] for d in docs} == {3}, docs[0]
        assert [d["source"]["offset"] for d in docs] == list(range(10))
        assert stale.cancelled()
        assert _calls(calls) == 2
    finally:
        pool.shutdown(wait=True, cancel=True)


@pytest.mark.parametrize("processes", [pytest.param(2, id="2-processes"), pytest.param(0, id="2-threads")])
def test_the_pool_scores_normally_after_many_drops(processes, calls):
    pool = ScoringPool(COUNTING, processes=processes, threads=2)
    try:
        pool.start(timeout=120)
        batch = _batch(20)
        for round_ in range(5):
            for _ in range(3):
                pool.submit(batch, "flows", [0] * 20, list(range(20)))
            pool.drop_all()
        futs = [pool.submit(batch, "flows", [i] * 20, list(range(20))) for i in range(4)]
        for i, fut in enumerate(futs):
            out = fut.result(timeout=60)
            pool.collected()
            assert {orjson.loads(r)["source"]["partition"] for r in out.records} == {i}
        assert pool.idle
    finally:
        pool.shutdown(wait=True, cancel=True)
