"""The committed auth anomaly detector: detection on fresh data, baseline, reproducible training."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from workers import telemetry
from workers.features import Baseline, Featurizer, ModelSpec, psi
from workers.inference import create_backend
from workers.training import auc

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "auth_anomaly"


@pytest.fixture(scope="module")
def parts():
    spec = ModelSpec.load(MODEL)
    return spec, Featurizer(spec), create_backend(spec)


@pytest.fixture(scope="module")
def fresh(parts):
    spec, fz, be = parts
    data = telemetry.generate_labelled("auth", 30_000, seed=987_654, attack_fraction=0.1)
    fb = fz.featurize(data.values)
    assert not fb.rejects
    return data, be.infer(fb.matrix)


def test_manifest_contract(parts):
    spec = parts[0]
    assert (spec.name, spec.event_kind, spec.score_name) == ("auth_anomaly", "auth", "anomaly_score")
    assert spec.schema_path.name == "auth.json" and spec.n_columns == 88
    assert spec.torch_module_path.name == "model.py" and spec.torch_weights_path.name == "model.pt"


def test_detects_attacks_without_labels(parts, fresh):
    """Unsupervised (trained without labels), yet separates attacks: AUC, recall, false positives."""
    data, s = fresh
    assert auc(data.label, s) > 0.98
    flagged = s >= parts[0].threshold
    assert flagged[data.label == 1].mean() > 0.65
    assert flagged[data.label == 0].mean() < 0.015


@pytest.mark.parametrize("attack", telemetry.AUTH_ATTACKS)
def test_each_attack_kind_scores_above_benign(fresh, attack):
    data, s = fresh
    assert np.median(s[data.subtype == attack]) > np.quantile(s[data.label == 0], 0.99)


def test_legit_travel_and_on_call_admins_are_mostly_not_flagged(parts, fresh):
    data, s = fresh
    for benign in ("travel", "oncall_admin", "service_account"):
        assert (s[data.subtype == benign] >= parts[0].threshold).mean() < 0.1, benign


def test_baseline_matches_manifest_and_calibration(parts):
    spec = parts[0]
    b = json.loads(spec.baseline_path.read_text())
    assert (b["model"], b["version"], b["columns"]) == (spec.name, spec.version, list(spec.columns))
    assert [f["name"] for f in b["features"]] == [f.name for f in spec.features]
    for f in b["features"]:
        assert abs(sum(f["frequencies"]) - 1) < 1e-3
    assert len(b["score"]["frequencies"]) == 10 and abs(sum(b["score"]["frequencies"]) - 1) < 1e-3
    assert b["calibration"]["quantile"] == 0.99 and b["calibration"]["k"] > 0
    assert b["training"]["test_metrics"]["auc"] > 0.98


def test_baseline_psi_low_on_default_stream_high_under_drift(parts):
    spec, fz, be = parts
    bl = Baseline.load(spec)

    def psis(drift):
        values = [v for _, v, _ in telemetry.generate("auth", 20_000, seed=555, drift=drift)]
        fb = fz.featurize(values)
        out = {f.name: psi(f.reference, c) for f, (c, _) in zip(bl.features, bl.feature_counts(fb.raw))}
        out["score"] = psi(bl.score_reference, bl.score_counts(be.infer(fb.matrix)))
        return out

    calm, drifted = psis(0.0), psis(2.0)
    assert max(calm.values()) < 0.05, calm
    assert drifted["src_network"] > 0.1, drifted


@pytest.mark.slow
def test_train_py_reproduces_the_committed_model(tmp_path):
    torch = pytest.importorskip("torch", reason="training needs torch: pip install torch==2.13.0 onnx")
    pytest.importorskip("onnx", reason="training needs onnx: pip install torch==2.13.0 onnx")
    out = subprocess.run([sys.executable, str(MODEL / "train.py"), "--seed", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    # outputs of the retrained model match the committed one within tolerance (bytes too, on this torch)
    spec = ModelSpec.load(MODEL)
    x = Featurizer(spec).featurize([v for _, v, _ in telemetry.generate("auth", 5000, seed=77)]).matrix
    import dataclasses

    retrained = create_backend(dataclasses.replace(spec, onnx_path=tmp_path / "model.onnx"))
    a, b = retrained.infer(x), create_backend(spec).infer(x)
    new = torch.load(tmp_path / "model.pt", weights_only=True)
    old = torch.load(MODEL / "model.pt", weights_only=True)
    if torch.version.cuda is None:
        # torch's CPU build, which made the committed artifacts: the same model.
        assert np.max(np.abs(a - b)) < 1e-5
        assert new.keys() == old.keys() and all(torch.allclose(new[k], old[k], atol=1e-6) for k in old)
        assert (json.loads((tmp_path / "baseline.json").read_text())["score"]
                == json.loads(spec.baseline_path.read_text())["score"])
        return
    # Another build of the same torch version (the CUDA wheel running on a CPU) uses other CPU
    # kernels; the autoencoder's training amplifies the last-bit differences (measured: 0.0079
    # at most on the calibrated score, p99 0.0031, 1 label of 5000 flipped at the threshold).
    # Bounds a few times those, still far below any change a retrained or broken model makes.
    assert new.keys() == old.keys()
    assert np.max(np.abs(a - b)) < 0.03
    assert np.mean((a >= spec.threshold) != (b >= spec.threshold)) <= 0.002
