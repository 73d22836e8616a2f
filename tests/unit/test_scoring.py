"""BatchScorer: one batch from raw values to score records, dead letters and drift counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from workers import telemetry
from workers.features import Featurizer, ModelSpec
from workers.scoring import BatchScorer, ScorerConfig

MODEL = Path(__file__).resolve().parents[2] / "models" / "flow_classifier"


class _PoisonRow:
    """The real backend, except that any batch holding one given feature row raises."""

    def __init__(self, inner, poison: np.ndarray):
        self.inner, self.poison, self.calls = inner, poison, 0

    def infer(self, batch):
        self.calls += 1
        if (batch == self.poison).all(axis=1).any():
            raise RuntimeError("kernel failed on this batch")
        return self.inner.infer(batch)


def _values(n, bad_fraction=0.0, seed=3):
    return [v for _, v, _ in telemetry.generate(kind="flow", count=n, seed=seed, bad_fraction=bad_fraction)]


def test_poison_row_becomes_one_dead_letter_and_its_neighbours_are_scored():
    scorer = BatchScorer(ScorerConfig(MODEL))
    values = _values(64)
    poison = Featurizer(ModelSpec.load(MODEL)).featurize(values).matrix[37].copy()
    scorer.backend = _PoisonRow(scorer.backend, poison)
    out = scorer.score(values, "flows", [0] * 64, list(range(100, 164)))
    assert [(r.position, r.reason) for r in out.rejects] == [(37, "inference_error")]
    assert "kernel failed" in out.rejects[0].detail
    assert out.positions.tolist() == [i for i in range(64) if i != 37]
    assert [orjson.loads(r)["source"]["offset"] for r in out.records] == [100 + i for i in range(64) if i != 37]
    assert scorer.backend.calls <= 1 + 2 * 6  # bisection: O(log n) failing calls per poison row
    assert out.drift.count == 63


def test_bad_records_are_rejected_in_place_and_the_rest_keep_their_sources():
    scorer = BatchScorer(ScorerConfig(MODEL))
    values = _values(500, bad_fraction=0.2, seed=8)
    values[0] = None  # a tombstone first: the fast path must resume after it
    values[-1] = b'{"event_id": "x"'  # and a broken record last
    topics = [f"t{i % 2}" for i in range(500)]
    out = scorer.score(values, topics, [i % 5 for i in range(500)], list(range(500)))
    rejected = {r.position: r.reason for r in out.rejects}
    assert rejected[0] == "tombstone" and rejected[499] == "bad_json"
    assert sorted(rejected) + out.positions.tolist() != [] and len(rejected) + len(out.records) == 500
    assert set(rejected).isdisjoint(out.positions.tolist())
    for pos, rec in zip(out.positions.tolist(), out.records):
        doc = orjson.loads(rec)
        assert doc["source"] == {"topic": f"t{pos % 2}", "partition": pos % 5, "offset": pos}
        assert doc["event_id"] == orjson.loads(values[pos])["event_id"]
