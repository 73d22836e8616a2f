"""The worker's exactly-once guarantee, through real processes and a real broker.

Each test fails if the guarantee it names breaks: an input offset with no
output (lost), with two outputs (duplicate), or an output for nothing.
"""

from __future__ import annotations

import random
import threading

import pytest

from workers.kafka.telemetry_producer import produce_telemetry

from .worker_harness import (
    Feeder,
    WorkerProc,
    wait_working,
    assert_exactly_once,
    committed_offsets,
    outcome,
    partition_ends,
    wait_until,
    worker_env,
)

PARTITIONS = 4
COMMITTED = "sluice_transactions_committed_total"


def _count_outputs(bootstrap, topic):
    from .worker_harness import read_all

    return len(read_all(bootstrap, f"{topic}-scores", idle=0.5, timeout=5)) + len(
        read_all(bootstrap, f"{topic}-dlq", idle=0.5, timeout=5)
    )


def test_sigkill_at_random_moments_then_restart_gives_exactly_one_output(bootstrap, new_topic, tmp_path):
    """SIGKILL mid-stream, repeatedly, restarting under the same replica id ⇒ no loss, no duplicate."""
    topic = new_topic(partitions=PARTITIONS, prefix="eos-kill")
    feeder = Feeder(bootstrap, topic, rate=3000, seed=11, bad_fraction=0.02)
    env = worker_env(bootstrap, topic, replica="r0", group=f"g-{topic}")
    w = WorkerProc(env, tmp_path / "worker.log").start()
    rng = random.Random(7)
    for _ in range(3):
        # a random moment, counted in this incarnation's committed transactions (mid-stream)
        after = rng.randint(1, 12)
        wait_until(lambda: not w.alive() or w.metric(COMMITTED) >= after, timeout=60,
                   what=f"the worker to commit {after} transactions")
        assert w.alive(), w.log()[-3000:]
        w.kill()
        w.start()
    total = feeder.stop()
    ends = partition_ends(bootstrap, topic, PARTITIONS)
    assert sum(ends.values()) == total
    wait_until(lambda: sum(committed_offsets(bootstrap, f"g-{topic}", topic, PARTITIONS).values()) == total,
               timeout=90, what="the worker to commit every input offset")
    w.wait_started()
    assert w.terminate() == 0, w.log()[-3000:]
    out = outcome(bootstrap, topic, total)
    assert_exactly_once(out, topic, ends)
    assert len(out.dead_letters) > 0.01 * total  # the malformed share went to the DLQ, not lost
    assert w.exits[:3] == [-9, -9, -9]


def test_replicas_joining_and_leaving_mid_stream_gives_exactly_one_output(bootstrap, new_topic, tmp_path):
    """Two, then three replicas; one leaves with SIGTERM, one is SIGKILLed and comes back ⇒ still exactly once."""
    topic = new_topic(partitions=PARTITIONS, prefix="eos-rebal")
    feeder = Feeder(bootstrap, topic, rate=3000, seed=12, bad_fraction=0.01)
    group = f"g-{topic}"
    ws = {r: WorkerProc(worker_env(bootstrap, topic, replica=r, group=group), tmp_path / f"{r}.log") for r in "abc"}
    ws["a"].start()
    wait_working(ws["a"])
    ws["b"].start()
    wait_working(ws["b"])  # joined: a gave partitions up
    ws["c"].start()
    wait_working(ws["c"])
    assert ws["b"].terminate() == 0, ws["b"].log()[-3000:]
    wait_working(ws["c"], transactions=ws["c"].metric(COMMITTED) + 1)  # c still committing after b left
    ws["c"].kill()
    ws["c"].start()
    total = feeder.stop()
    ends = partition_ends(bootstrap, topic, PARTITIONS)
    # b left for good: as a static member its partitions move after the session timeout.
    wait_until(lambda: sum(committed_offsets(bootstrap, group, topic, PARTITIONS).values()) == total,
               timeout=120, what="the replicas to commit every input offset")
    for r in "ac":
        ws[r].wait_started()
        assert ws[r].alive(), ws[r].log()[-3000:]
        assert ws[r].terminate() == 0, ws[r].log()[-3000:]
    assert_exactly_once(outcome(bootstrap, topic, total), topic, ends)


def test_sigterm_commits_everything_consumed(bootstrap, new_topic, tmp_path):
    """SIGTERM ⇒ drain, commit, exit 0: every consumed record's output is committed with its offset."""
    topic = new_topic(partitions=2, prefix="eos-term")
    env = worker_env(bootstrap, topic, replica="r0", group=f"g-{topic}",
                     SLUICE_TRANSACTIONS__COMMIT_INTERVAL_MS="60000")  # no interval commit: idle ones only
    # A steady feed, so that work is consumed but not committed when the signal comes. (A
    # preloaded topic is scored in well under a second, then committed as idle: the test once
    # saw that commit before it looked.)
    stop = threading.Event()
    feeder = threading.Thread(target=produce_telemetry, args=(bootstrap, topic), daemon=True,
                              kwargs={"count": 10_000_000, "rate": 3000, "seed": 13, "bad_fraction": 0.01,
                                      "stop": stop})
    feeder.start()
    w = WorkerProc(env, tmp_path / "worker.log").start()
    try:
        wait_until(lambda: w.metric("sluice_events_scored_total") >= 1000, timeout=60, what="1000 events scored")
        consumed = w.metric("sluice_events_consumed_total")
        assert w.terminate() == 0, w.log()[-3000:]
    finally:
        stop.set()
        feeder.join(30)
    committed = committed_offsets(bootstrap, f"g-{topic}", topic, 2)
    n_committed = sum(o for o in committed.values() if o > 0)
    assert n_committed >= consumed, (n_committed, consumed)  # everything consumed before the signal
    out = outcome(bootstrap, topic, n_committed)
    assert len(out.scores) + len(out.dead_letters) == n_committed
    assert_exactly_once(out, topic, {p: max(o, 0) for p, o in committed.items()})
    assert '"drained and committed; closing"' in w.log()


@pytest.mark.parametrize("replica", ["solo"])
def test_restart_with_same_replica_id_fences_the_zombie(bootstrap, new_topic, tmp_path, replica):
    """A second process with the same replica id fences the first: the first exits non-zero, outputs stay exactly once."""
    topic = new_topic(partitions=2, prefix="eos-fence")
    total = 10_000
    feeder = threading.Thread(
        target=produce_telemetry, args=(bootstrap, topic), kwargs={"count": total, "rate": 4000, "seed": 14},
        daemon=True,
    )
    feeder.start()
    env = worker_env(bootstrap, topic, replica=replica, group=f"g-{topic}")
    zombie = WorkerProc(env, tmp_path / "zombie.log").start()
    wait_until(lambda: '"partitions assigned"' in zombie.log(), timeout=60, what="assignment")
    wait_working(zombie)  # the zombie has an epoch in use when the successor's init fences it
    successor = WorkerProc(env, tmp_path / "successor.log").start()
    try:
        wait_until(lambda: not zombie.alive(), timeout=60, what="the zombie to be fenced and exit")
    except AssertionError:
        raise AssertionError("zombie still alive; its log:\n" + zombie.log()[-4000:]
                             + "\nsuccessor log:\n" + successor.log()[-3000:]) from None
    assert zombie.proc.returncode == 3, f"a fenced replica exits 3, got {zombie.proc.returncode}"
    feeder.join(60)
    ends = partition_ends(bootstrap, topic, 2)
    wait_until(lambda: sum(committed_offsets(bootstrap, f"g-{topic}", topic, 2).values()) == total,
               timeout=90, what="the successor to commit every input offset")
    successor.wait_started()
    assert successor.terminate() == 0, successor.log()[-3000:]
    assert_exactly_once(outcome(bootstrap, topic, total), topic, ends)
