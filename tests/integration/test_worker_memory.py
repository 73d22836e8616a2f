"""Peak memory is a function of the configuration, not of the backlog (DESIGN, "Backpressure
and memory"): the same worker, run over a preloaded 100k-event and a preloaded 1M-event topic,
reaches the same peak RSS within a stated margin.

RSS is measured for the worker's whole process tree (the worker and its scoring processes),
as the per-process high-water marks (``VmHWM`` in ``/proc/<pid>/status``) summed over every
process the tree ever had, sampled while it runs so that a process that exits still counts.
That sum is an upper bound of the tree's simultaneous peak, and it misses no short spike.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from workers.kafka.telemetry_producer import produce_telemetry

from .worker_harness import WorkerProc, all_committed, partition_ends, wait_until, worker_env

PARTITIONS = 4
SIZES = (100_000, 1_000_000)
# A tenfold backlog may cost at most this much more peak RSS: the larger of a share of the
# small run's peak and a fixed allowance. The share covers allocator noise and Python's
# heap settling; the fixed part covers librdkafka's buffers filling up to their configured
# caps in the longer run when the small one ended before reaching them. Before the buffers
# were sized from the settings the tree grew ~100 MiB from 100k to 300k events.
MARGIN_SHARE = 0.15
MARGIN_MIB = 40.0
SAMPLE_INTERVAL_S = 0.1
# Generous: 1M events through one worker on a loaded 2-core machine (measured ~25 s alone).
DRAIN_TIMEOUT_S = 240.0

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's children file: a child belongs to the
    thread that forked it)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out.extend(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError:
            continue
    return out


def _tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


def _hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class TreePeak:
    """Samples the peak RSS of a process tree from /proc until stopped."""

    def __init__(self, root: int):
        self.root = root
        self.hwm: dict[int, int] = {}   # pid -> its highest VmHWM seen (KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_INTERVAL_S)

    def sample(self) -> None:
        for pid in _tree(self.root):
            kib = _hwm_kib(pid)
            if kib is not None:
                self.hwm[pid] = max(self.hwm.get(pid, 0), kib)


    def stop(self) -> float:
        """Stop sampling; the tree's peak in MiB."""
        self._stop.set()
        self._thread.join(5)
        self.sample()
        return sum(self.hwm.values()) / 1024.0


def _run_worker_over(bootstrap: str, new_topic, tmp_path: Path, total: int) -> tuple[float, int, float]:
    """Preload ``total`` events, run the worker until it has committed every offset; return
    (peak RSS of its tree in MiB, processes in the tree, seconds to drain)."""
    topic = new_topic(partitions=PARTITIONS, prefix=f"mem{total // 1000}k")
    assert produce_telemetry(bootstrap, topic, count=total, seed=31, bad_fraction=0.01) == total
    assert sum(partition_ends(bootstrap, topic, PARTITIONS).values()) == total
    group = f"g-{topic}"
    w = WorkerProc(worker_env(bootstrap, topic, replica="mem", group=group), tmp_path / f"worker-{total}.log")
    w.start()
    peak = TreePeak(w.proc.pid)
    start = time.monotonic()
    try:
        wait_until(lambda: not w.alive() or all_committed(bootstrap, group, topic, PARTITIONS, total),
                   timeout=DRAIN_TIMEOUT_S, interval=1.0, what=f"the worker to commit all {total} input offsets")
        assert w.alive(), w.log()[-3000:]
        seconds = time.monotonic() - start
    finally:
        mib = peak.stop()
    assert w.terminate() == 0, w.log()[-3000:]
    return mib, len(peak.hwm), seconds


def test_peak_rss_does_not_grow_with_the_backlog(bootstrap, new_topic, tmp_path):
    """The same configuration over a 10x larger backlog: the same peak RSS within the margin."""
    (small, n_small, t_small), (large, n_large, t_large) = (
        _run_worker_over(bootstrap, new_topic, tmp_path, total) for total in SIZES)
    print(f"\npeak RSS of the worker's tree: {small:.0f} MiB over {SIZES[0]} events ({n_small} processes, "
          f"{t_small:.1f} s), {large:.0f} MiB over {SIZES[1]} events ({n_large} processes, {t_large:.1f} s)")
    assert n_small >= 2 and n_large >= 2, "the scoring processes were not seen: the measure would miss them"
    margin = max(MARGIN_SHARE * small, MARGIN_MIB)
    assert large - small <= margin, (
        f"peak RSS grew with the backlog: {small:.0f} MiB at {SIZES[0]} events, {large:.0f} MiB at {SIZES[1]} "
        f"(allowed: +{margin:.0f} MiB)")
