"""sluice models quantize: FP16 / INT8 variants, their quality report, and models check against the parent."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="variants need onnx (pip install 'sluice[quantize]')")
ort = pytest.importorskip("onnxruntime", reason="variants need onnxruntime (pip install 'sluice[cpu]')")

from workers import telemetry  # noqa: E402
from workers.cli import build_parser  # noqa: E402
from workers.features import Featurizer, ModelSpec  # noqa: E402
from workers.models import check_model, describe_model  # noqa: E402
from workers import variants  # noqa: E402
from workers.variants import auc, quantize, read_variant, sha256_file  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ["flow_classifier", "auth_anomaly"]
# small samples keep the module fast; the README's figures come from the defaults (20,000 held out)
CAL_EVENTS = 600
HELDOUT_EVENTS = 3000
CHECK_EVENTS = 1200


def _make(parent: pathlib.Path, precision: str, out: pathlib.Path, **kw):
    return quantize(parent, precision, out, calibration_events=CAL_EVENTS, heldout_events=HELDOUT_EVENTS, **kw)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Every shipped model in both precisions, made once for the module."""
    base = tmp_path_factory.mktemp("variants")
    out = {}
    for m in MODELS:
        for p in variants.PRECISIONS:
            res = _make(ROOT / "models" / m, p, base / f"{m}_{p}")
            assert res.written and not res.violations, res.violations
            out[m, p] = res.path
    return out


def _failures(rep) -> dict[str, str]:
    return {i["check"]: i["detail"] for i in rep.items if i["status"] == "FAIL"}


@pytest.mark.parametrize("precision", variants.PRECISIONS)
@pytest.mark.parametrize("model", MODELS)
def test_variant_passes_check_and_keeps_the_contract(made, model, precision):
    path = made[model, precision]
    parent = ModelSpec.load(ROOT / "models" / model)
    spec = ModelSpec.load(path)
    assert spec.name == parent.name and spec.version == f"{parent.version}+{precision}"
    assert spec.features == parent.features and spec.threshold == parent.threshold
    assert spec.torch_weights_path is None and not (path / "model.pt").exists()
    v = read_variant(path)
    assert v.precision == precision and v.method == ("fp16-convert" if precision == "fp16" else "int8-static")
    assert v.parent_folder() == parent.path.resolve() and v.parent_version == parent.version
    assert v.parent_sha256 == {"manifest": sha256_file(parent.manifest_path), "model": sha256_file(parent.onnx_path),
                               "baseline": sha256_file(parent.baseline_path)}
    assert v.tolerance == variants.DEFAULT_TOLERANCE[precision]

    rep = check_model(path, events=CHECK_EVENTS)
    assert rep.ok, _failures(rep)
    status = {i["check"]: i["status"] for i in rep.items}
    assert status["onnx vs torch"] == "skip" and status["onnx metadata"] == "ok" and status["baseline"] == "ok"
    for k in variants.TOLERANCE_KEYS:
        assert status[f"variant vs parent: {k}"] == "ok"
    assert status["variant parent sha256"] == status["variant quality report"] == "ok"
    assert status["variant batch invariance"] == "ok"


@pytest.mark.parametrize("precision", variants.PRECISIONS)
@pytest.mark.parametrize("model", MODELS)
def test_graph_is_in_the_stated_precision(made, model, precision):
    g = onnx.load(str(made[model, precision] / "model.onnx"))
    types = {i.data_type for i in g.graph.initializer}
    ops = {n.op_type for n in g.graph.node}
    assert g.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io stays float32
    assert g.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    if precision == "fp16":
        assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    else:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and onnx.TensorProto.INT8 in types
    meta = {p.key: p.value for p in g.metadata_props}
    assert meta["precision"] == precision and meta["version"].endswith(f"+{precision}")


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC by brute force over every (attack, benign) pair: independent of variants.auc's ranks."""
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def _raw_scores(onnx_path: pathlib.Path, spec: ModelSpec, X: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run([spec.output_name], {spec.input_name: X})[0].astype(np.float64)


@pytest.mark.parametrize("precision", variants.PRECISIONS)
@pytest.mark.parametrize("model", MODELS)
def test_quality_report_is_recomputed_from_the_variant(made, model, precision):
    path = made[model, precision]
    q = json.loads((path / "quality.json").read_text())
    parent = ModelSpec.load(ROOT / "models" / model)
    assert q["variant"]["sha256"] == sha256_file(path / "model.onnx")
    assert q["parent"]["sha256"] == sha256_file(parent.onnx_path)
    h = q["heldout"]
    assert h["seed"] != (q["calibration"] or {}).get("seed") and h["events"] == q["events"] == HELDOUT_EVENTS

    lab = telemetry.generate_labelled(h["event_kind"], h["events"], seed=h["seed"], attack_fraction=h["attack_fraction"])
    X = Featurizer(parent).featurize(lab.values).matrix
    assert len(X) == h["events"]
    sp = _raw_scores(parent.onnx_path, parent, X)
    sv = _raw_scores(path / "model.onnx", parent, X)
    y = lab.label

    # the report scored through the worker's backend in padded batches; here one plain ORT call,
    # so scores may differ in the last float32 bits: figures agree within that, counts to one event
    n = len(y)
    assert q["attacks"] == int(y.sum())
    assert q["auc"]["parent"] == pytest.approx(_pairwise_auc(y, sp), abs=1e-5)
    assert q["auc"]["variant"] == pytest.approx(_pairwise_auc(y, sv), abs=1e-5)
    assert q["auc_drop"] == pytest.approx(_pairwise_auc(y, sp) - _pairwise_auc(y, sv), abs=2e-5)
    d = np.abs(sv - sp)
    assert q["max_abs_diff"] == pytest.approx(d.max(), abs=1e-5)
    assert q["p99_abs_diff"] == pytest.approx(np.quantile(d, 0.99), abs=1e-5)
    flips = int(((sp >= parent.threshold) != (sv >= parent.threshold)).sum())
    assert abs(q["flips"] - flips) <= 1 and q["flip_rate"] == pytest.approx(flips / n, abs=1.01 / n)
    attacks = telemetry.KINDS[h["event_kind"]].attacks
    assert set(q["recall_by_attack"]) == set(attacks)
    for kind in attacks:
        m = lab.subtype == kind
        r = q["recall_by_attack"][kind]
        assert r["events"] == int(m.sum()) > 0
        assert r["parent"] == pytest.approx((sp[m] >= parent.threshold).mean(), abs=1.01 / m.sum())
        assert r["variant"] == pytest.approx((sv[m] >= parent.threshold).mean(), abs=1.01 / m.sum())


def test_auc_counts_ties_half():
    rng = np.random.default_rng(5)
    y = (rng.random(400) < 0.3).astype(np.int8)
    s = np.round(rng.random(400) + 0.3 * y, 1)  # coarse scores: many ties
    assert auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)
    assert auc(np.array([0, 1]), np.array([0.2, 0.2])) == 0.5
    assert np.isnan(auc(np.zeros(3), np.arange(3.0)))


def test_check_fails_when_the_parent_changed(tmp_path):
    parent = tmp_path / "flow_classifier"
    shutil.copytree(ROOT / "models" / "flow_classifier", parent)
    res = _make(parent, "fp16", tmp_path / "flow_fp16")
    assert read_variant(res.path).parent_path == str(parent.resolve())  # outside the repository: absolute
    assert check_model(res.path, events=CHECK_EVENTS).ok
    # retrained (here: its baseline rewritten) after the variant was made
    bl = json.loads((parent / "baseline.json").read_text())
    bl["score"]["frequencies"] = list(reversed(bl["score"]["frequencies"]))
    (parent / "baseline.json").write_text(json.dumps(bl))
    bad = _failures(check_model(res.path, events=CHECK_EVENTS))
    assert set(bad) == {"variant parent sha256"}, bad
    assert "the parent changed since this variant was made: baseline" in bad["variant parent sha256"]
    assert "re-run sluice models quantize" in bad["variant parent sha256"]


def test_check_fails_outside_the_manifest_tolerance(made, tmp_path):
    path = tmp_path / "auth_int8"
    shutil.copytree(made["auth_anomaly", "int8"], path)
    mf = path / "manifest.toml"
    text = mf.read_text()
    assert "max_abs_diff = 0.3\n" in text
    mf.write_text(text.replace("max_abs_diff = 0.3\n", "max_abs_diff = 0.001\n"))
    bad = _failures(check_model(path, events=CHECK_EVENTS))
    assert set(bad) == {"variant vs parent: max_abs_diff", "variant quality report"}, bad
    assert "> 0.001 on 1200 fresh events" in bad["variant vs parent: max_abs_diff"]
    assert "[variant.tolerance] max_abs_diff" in bad["variant vs parent: max_abs_diff"]
    assert "max_abs_diff" in bad["variant quality report"]


def test_check_fails_when_the_variant_graph_is_not_what_the_report_measured(made, tmp_path):
    path = tmp_path / "flow_fp16"
    shutil.copytree(made["flow_classifier", "fp16"], path)
    shutil.copy(made["flow_classifier", "int8"] / "model.onnx", path / "model.onnx")
    g = onnx.load(str(path / "model.onnx"))
    for p in g.metadata_props:
        if p.key == "version":
            p.value = "1.0.0+fp16"
    onnx.save(g, str(path / "model.onnx"))
    bad = _failures(check_model(path, events=CHECK_EVENTS))
    assert "it measured another model.onnx" in bad["variant quality report"]
    assert "variant vs parent: max_abs_diff" in bad  # int8 differences against fp16 bounds


def test_malformed_variant_table_is_named(made, tmp_path):
    path = tmp_path / "flow_fp16"
    shutil.copytree(made["flow_classifier", "fp16"], path)
    mf = path / "manifest.toml"
    mf.write_text(mf.read_text().replace('precision = "fp16"', 'precision = "int4"'))
    bad = _failures(check_model(path, events=CHECK_EVENTS))
    assert "key 'variant.precision': 'int4' is not one of fp16, int8" in bad["variant manifest"]


def test_dynamic_int8_says_it_depends_on_the_batch(tmp_path):
    res = _make(ROOT / "models" / "auth_anomaly", "int8", tmp_path / "auth_dyn", method="dynamic")
    assert res.written, res.violations
    v = read_variant(res.path)
    assert v.method == "int8-dynamic" and v.batch_invariant is False
    ops = {n.op_type for n in onnx.load(str(res.path / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops  # Gemm rewritten, else nothing would be quantized
    rep = check_model(res.path, events=CHECK_EVENTS)
    assert rep.ok, _failures(rep)
    inv = next(i for i in rep.items if i["check"] == "variant batch invariance")
    assert inv["status"] == "skip" and "batch_invariant = false" in inv["detail"]


def test_gemm_rewrite_keeps_the_scores():
    spec = ModelSpec.load(ROOT / "models" / "flow_classifier")
    lab = telemetry.generate_labelled("flow", 500, seed=3)
    X = Featurizer(spec).featurize(lab.values).matrix
    m = variants.gemm_to_matmul(onnx.load(str(spec.onnx_path)))
    onnx.checker.check_model(m)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run([spec.output_name], {spec.input_name: X})[0]
    assert np.max(np.abs(got - _raw_scores(spec.onnx_path, spec, X))) < 1e-6


def test_cli_quantize_refuses_a_variant_outside_its_tolerance(tmp_path):
    out = tmp_path / "auth_int8"
    p = subprocess.run([sys.executable, "-m", "workers", "models", "quantize", "--model", "models/auth_anomaly",
                        "--precision", "int8", "--out", str(out), "--calibration-events", str(CAL_EVENTS),
                        "--heldout-events", str(HELDOUT_EVENTS), "--tolerance", "flip_rate=0"],
                       capture_output=True, cwd=ROOT, timeout=120, text=True)
    assert p.returncode == 1, p.stderr
    assert "outside the tolerance: flip_rate" in p.stderr and "nothing written" in p.stderr
    assert "recall password_spray" in p.stdout
    assert not out.exists() and not list(tmp_path.glob(".auth_int8.tmp-*"))


def test_quantize_refusals_name_the_flag(made, tmp_path):
    with pytest.raises(variants.VariantError, match="is itself a variant"):
        _make(made["flow_classifier", "fp16"], "int8", tmp_path / "x")
    with pytest.raises(variants.VariantError, match="--out .*exists and is not empty; pass --force"):
        _make(ROOT / "models" / "flow_classifier", "fp16", made["flow_classifier", "fp16"])
    with pytest.raises(variants.VariantError, match="--force replaces variants only"):
        _make(ROOT / "models" / "flow_classifier", "fp16", ROOT / "models" / "auth_anomaly", force=True)
    with pytest.raises(variants.VariantError, match="--method static: applies to int8 only"):
        _make(ROOT / "models" / "flow_classifier", "fp16", tmp_path / "y", method="static")
    with pytest.raises(variants.VariantError, match="--tolerance flip: unknown key"):
        _make(ROOT / "models" / "flow_classifier", "fp16", tmp_path / "z", tolerance={"flip": 0.1})


def test_models_list_shows_variants_with_onnx_backends_only(made, tmp_path):
    m = describe_model(made["auth_anomaly", "int8"])
    assert m["name"] == "auth_anomaly" and m["version"] == "1.0.0+int8"
    assert m["variant"] == {"precision": "int8", "method": "int8-static", "parent": "models/auth_anomaly",
                            "parent_version": "1.0.0"}
    assert "onnxruntime" in m["backends"] and "torch" not in m["backends"]
    assert describe_model(ROOT / "models" / "auth_anomaly")["variant"] is None


def test_cli_defaults_are_the_module_constants():
    args = build_parser().parse_args(["models", "quantize", "--model", "m", "--precision", "fp16", "--out", "o"])
    assert (args.calibration_events, args.calibration_seed, args.heldout_events, args.heldout_seed) == (
        variants.CALIBRATION_EVENTS, variants.CALIBRATION_SEED, variants.HELDOUT_EVENTS, variants.HELDOUT_SEED)
