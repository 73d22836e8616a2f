"""An event's score does not depend on the batch it was scored in (worker vs. sluice score)."""

import numpy as np
import pytest

from workers import telemetry
from workers.features import Featurizer, ModelSpec, repo_root
from workers.inference import create_backend


@pytest.mark.parametrize("model", ["flow_classifier", "auth_anomaly"])
def test_scores_are_bitwise_equal_across_batch_compositions(model):
    spec = ModelSpec.load(repo_root() / "models" / model)
    backend = create_backend(spec)
    X = Featurizer(spec).featurize(
        [v for _, v, _ in telemetry.generate(kind=spec.event_kind, count=3000, seed=3)]
    ).matrix
    whole = backend.infer(X)
    rng = np.random.default_rng(0)
    parts, i = [], 0
    while i < len(X):
        n = int(rng.integers(1, 700))
        parts.append(backend.infer(X[i : i + n]))
        i += n
    assert np.array_equal(np.concatenate(parts), whole)
    singles = np.concatenate([backend.infer(X[i : i + 1]) for i in range(300)])
    assert np.array_equal(singles, whole[:300])
