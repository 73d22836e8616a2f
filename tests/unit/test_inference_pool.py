"""Inference pool: order of results, and a poison row isolated by bisection."""

import numpy as np

from workers.inference.pool import InferencePool


class PoisonBackend:
    """Scores rows by their first column; raises on any batch containing a negative first column."""

    name, device = "poison", "cpu"

    def __init__(self):
        self.calls = 0

    def infer(self, batch):
        self.calls += 1
        if (batch[:, 0] < 0).any():
            raise RuntimeError("kernel failed on this batch")
        return batch[:, 0].astype(np.float32) / 100


def test_results_come_back_per_submission():
    pool = InferencePool(PoisonBackend(), threads=2)
    futs = [pool.submit(np.full((4, 2), i, np.float32)) for i in range(6)]
    for i, fut in enumerate(futs):
        res = fut.result()
        pool.collected()
        assert np.allclose(res.scores, i / 100)
        assert res.failed == {}
    assert pool.idle
    pool.shutdown()


def test_poison_row_fails_alone():
    backend = PoisonBackend()
    pool = InferencePool(backend, threads=1)
    m = np.arange(16, dtype=np.float32).reshape(8, 2)
    m[5, 0] = -1
    res = pool.submit(m).result()
    pool.collected()
    assert list(res.failed) == [5]
    assert "kernel failed" in res.failed[5]
    assert np.isnan(res.scores[5])
    ok = np.delete(np.arange(8), 5)
    assert np.allclose(res.scores[ok], m[ok, 0] / 100)
    assert backend.calls <= 1 + 2 * 3  # bisection: O(log n) failing calls per poison row
    pool.shutdown()
