"""Quantized model variants: ``sluice models quantize`` and the checks ``sluice models check`` adds for them.

A variant is a model folder of the same contract as its parent (``manifest.toml``,
``model.onnx``, ``baseline.json``; no torch artifacts) whose graph runs in a lower
precision:

- ``fp16``: the FP32 graph converted to float16 (onnxruntime's float16 converter, the one
  onnxconverter-common ships, bundled in ``onnxruntime.transformers``), inputs and outputs
  kept float32 so the worker feeds and reads it exactly as the parent;
- ``int8``: ONNX Runtime static quantization (QDQ, MinMax calibration, per-channel weights)
  calibrated on events from :mod:`workers.telemetry` featurized with the model's own
  Featurizer; dynamic quantization (weights int8, activations quantized per batch at run
  time) when static does not apply: no telemetry generator for the model's event kind, or
  ``--method dynamic``.

The variant's manifest is the parent's with ``version = "<parent>+<precision>"`` (the name
stays the parent's, so drift reports and lineage group them), the torch artifacts dropped,
and a ``[variant]`` table: the parent (path, name, version, sha256 of its manifest, model and
baseline), the precision, the method, whether scores are batch-invariant, the calibration
sample, and the tolerance the variant promises against its parent. ``quality.json`` beside
it compares the variant with the parent on a held-out labelled set drawn with another seed
than the calibration sample: AUC of both, recall per attack kind at the threshold, the share
of labels that flip, and the score differences. ``sluice models check`` recomputes those
figures on fresh events and fails a variant outside its tolerance or whose parent changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
from typing import Any, Iterable

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from workers.features import Featurizer, ModelSpec, psi, repo_root

__all__ = [
    "PRECISIONS", "METHODS", "TOLERANCE_KEYS", "DEFAULT_TOLERANCE", "Variant", "VariantError",
    "read_variant", "quantize", "quality_report", "compare_scores", "violations", "auc", "check_variant",
    "sha256_file", "gemm_to_matmul", "QuantizeResult",
]

PRECISIONS = ("fp16", "int8")
#: how a variant's graph was made; the manifest's [variant] method is one of these
METHODS = ("fp16-convert", "int8-static", "int8-dynamic")
TOLERANCE_KEYS = ("max_abs_diff", "p99_abs_diff", "flip_rate", "auc_drop")

# Default tolerances against the FP32 parent, per precision (override with --tolerance KEY=VALUE).
# fp16 reuses the bounds the project already holds TensorRT's FP16 kernels to (workers/models.py:
# PARITY_ATOL_FP16 = 2e-2 on scores, FP16_MAX_LABEL_FLIP_FRACTION = 0.5% of labels). Measured on
# 20,000 held-out events: max |diff| 1.4e-3 (flow_classifier) and 4.1e-3 (auth_anomaly), 0-4 flips.
# int8 is far coarser on auth_anomaly, whose score is a calibrated log reconstruction error:
# measured max |diff| 0.20, p99 0.086, 0.68% flips with static per-channel INT8 (flow_classifier:
# 0.16, 0.0096, 0.01%); the bounds leave ~1.5x that for fresh samples. AUC did not drop for either.
DEFAULT_TOLERANCE: dict[str, dict[str, float]] = {
    "fp16": {"max_abs_diff": 2e-2, "p99_abs_diff": 5e-3, "flip_rate": 5e-3, "auc_drop": 1e-3},
    "int8": {"max_abs_diff": 0.3, "p99_abs_diff": 0.15, "flip_rate": 0.015, "auc_drop": 5e-3},
}

# Seeds of the telemetry samples, apart from training's (train.py uses seed*10 + 1..4) and from
# check_model's (12345, 12346): calibration and the held-out set never share an event.
CALIBRATION_SEED = 90_001
HELDOUT_SEED = 90_002
#: models check scores fresh events drawn with check_model's seed + this offset (not the held-out set)
CHECK_SEED_OFFSET = 7
#: calibration as production traffic: mostly benign (the share the demo and bench stream)
CALIBRATION_ATTACK_FRACTION = 0.05
CALIBRATION_EVENTS = 4000
#: held-out set richer in attacks than production, so recall per attack kind rests on enough events
HELDOUT_ATTACK_FRACTION = 0.1
HELDOUT_EVENTS = 20_000
#: rows per ORT call in calibration and quality scoring. Dynamic INT8 quantizes activations per call,
#: so its scores depend on the batch; the figures are measured at the worker's default batch size.
SCORING_BATCH = 1024
CALIBRATION_BATCH = 256
#: rows compared for batch invariance (one batch against one row at a time)
INVARIANCE_ROWS = 64


class VariantError(ValueError):
    """A variant cannot be made or read; the message names the flag, key or file and the fix."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """The ``[variant]`` table of a variant's manifest."""

    folder: pathlib.Path
    precision: str
    method: str
    parent_path: str
    parent_name: str
    parent_version: str
    parent_sha256: dict[str, str]
    tolerance: dict[str, float]
    batch_invariant: bool
    calibration: dict[str, Any] | None = None

    def parent_folder(self) -> pathlib.Path:
        """The parent's folder: absolute, or relative to the repository root, else to this folder."""
        p = pathlib.Path(self.parent_path)
        if p.is_absolute():
            return p
        for cand in (repo_root() / p, self.folder / p):
            if (cand / "manifest.toml").is_file():
                return cand.resolve()
        return repo_root() / p


def sha256_file(path: pathlib.Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _parent_hashes(spec: ModelSpec) -> dict[str, str]:
    return {"manifest": sha256_file(spec.manifest_path), "model": sha256_file(spec.onnx_path),
            "baseline": sha256_file(spec.baseline_path)}


def read_variant(path: str | pathlib.Path) -> Variant | None:
    """The ``[variant]`` table of a model folder (or manifest); None for a model that is no variant."""
    p = pathlib.Path(path)
    mf = p / "manifest.toml" if p.is_dir() else p
    try:
        doc = tomllib.loads(mf.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise VariantError(f"{mf}: cannot read the manifest: {e}") from None
    v = doc.get("variant")
    if v is None:
        return None

    def err(key: str, msg: str) -> VariantError:
        return VariantError(f"{mf}: key 'variant.{key}': {msg} (re-run sluice models quantize)")

    def get(d: Any, key: str, typ: type | tuple, where: str = "") -> Any:
        if not isinstance(d, dict) or key not in d:
            raise err(where + key, "missing")
        val = d[key]
        if not isinstance(val, typ) or (isinstance(val, bool) and typ is not bool):
            raise err(where + key, f"expected {getattr(typ, '__name__', typ)}, got {type(val).__name__} {val!r}")
        return val

    precision = get(v, "precision", str)
    if precision not in PRECISIONS:
        raise err("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    method = get(v, "method", str)
    if method not in METHODS or method.split("-")[0] != precision:
        raise err("method", f"{method!r} is not a {precision} method ({', '.join(METHODS)})")
    parent = get(v, "parent", dict)
    sha = get(parent, "sha256", dict, "parent.")
    for k in ("manifest", "model", "baseline"):
        h = get(sha, k, str, "parent.sha256.")
        if not re.fullmatch(r"[0-9a-f]{64}", h):
            raise err(f"parent.sha256.{k}", "must be 64 lowercase hex digits")
    tol = get(v, "tolerance", dict)
    unknown = set(tol) - set(TOLERANCE_KEYS)
    if unknown:
        raise err(f"tolerance.{sorted(unknown)[0]}", f"unknown key (known: {', '.join(TOLERANCE_KEYS)})")
    tolerance = {}
    for k in TOLERANCE_KEYS:
        x = get(tol, k, (int, float), "tolerance.")
        if not (math.isfinite(x) and x >= 0):
            raise err(f"tolerance.{k}", f"must be a finite number >= 0, got {x!r}")
        tolerance[k] = float(x)
    cal = v.get("calibration")
    if cal is not None and not isinstance(cal, dict):
        raise err("calibration", "must be a table")
    return Variant(folder=mf.parent, precision=precision, method=method,
                   parent_path=get(parent, "path", str, "parent."), parent_name=get(parent, "name", str, "parent."),
                   parent_version=get(parent, "version", str, "parent."), parent_sha256={k: sha[k] for k in sha},
                   tolerance=tolerance, batch_invariant=get(v, "batch_invariant", bool), calibration=cal)


# ----------------------------------------------------------------------------- metrics


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC from rank statistics (Mann-Whitney U), ties counted half; NaN without both classes."""
    y = np.asarray(label).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average rank of each tie group
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _round(x: float, digits: int = 7) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def compare_scores(parent: np.ndarray, variant: np.ndarray, label: np.ndarray, subtype: np.ndarray,
                   threshold: float, attacks: Iterable[str]) -> dict:
    """The figures of a quality report: both models' AUC and recall per attack kind, label flips, score diffs."""
    parent = np.asarray(parent, dtype=np.float64)
    variant = np.asarray(variant, dtype=np.float64)
    label = np.asarray(label).astype(bool)
    diff = np.abs(variant - parent)
    fp, fv = parent >= threshold, variant >= threshold  # the worker's label rule (records.ScoreEncoder)
    recall = {}
    for kind in attacks:
        m = subtype == kind
        n = int(m.sum())
        rp = float(fp[m].mean()) if n else float("nan")
        rv = float(fv[m].mean()) if n else float("nan")
        recall[kind] = {"events": n, "parent": _round(rp, 6), "variant": _round(rv, 6), "delta": _round(rv - rp, 6)}
    benign = ~label
    a_p, a_v = auc(label, parent), auc(label, variant)
    edges = np.linspace(0.0, 1.0, 11)  # the score bins of baseline.json (Baseline.score_counts)
    hp = np.histogram(np.clip(parent, 0, 1), edges)[0]
    hv = np.histogram(np.clip(variant, 0, 1), edges)[0]
    flips = int((fp != fv).sum())
    return {
        "events": int(len(parent)),
        "attacks": int(label.sum()),
        "threshold": float(threshold),
        "auc": {"parent": _round(a_p), "variant": _round(a_v)},
        "auc_drop": _round(a_p - a_v),
        "recall_by_attack": recall,
        "benign_flagged": {"parent": _round(float(fp[benign].mean()) if benign.any() else float("nan"), 6),
                           "variant": _round(float(fv[benign].mean()) if benign.any() else float("nan"), 6)},
        "flips": flips,
        "flips_up": int((fv & ~fp).sum()),
        "flip_rate": _round(flips / max(1, len(parent))),
        "max_abs_diff": _round(float(diff.max()) if len(diff) else 0.0, 9),
        "p99_abs_diff": _round(float(np.quantile(diff, 0.99)) if len(diff) else 0.0, 9),
        "mean_abs_diff": _round(float(diff.mean()) if len(diff) else 0.0, 9),
        # drift of the variant's scores against the parent's on the same events (PSI over the
        # baseline's 10 score bins): what a drift report would show after switching to it
        "score_psi": _round(psi(hp / max(1, hp.sum()), hv)),
    }


def violations(figures: dict, tolerance: dict[str, float]) -> list[str]:
    """Tolerance keys the figures exceed, as 'key value > bound' strings."""
    out = []
    for k in TOLERANCE_KEYS:
        x = figures.get(k)
        if x is None or not math.isfinite(x) or x > tolerance[k]:
            out.append(f"{k} {x} > {tolerance[k]:g}")
    return out


# ----------------------------------------------------------------------------- scoring


def _backend(spec: ModelSpec):
    from workers.inference import create_backend

    return create_backend(spec, "onnxruntime", "cpu")


def _score(backend, matrix: np.ndarray, batch: int = SCORING_BATCH) -> np.ndarray:
    if not len(matrix):
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([backend.infer(matrix[i:i + batch]) for i in range(0, len(matrix), batch)])


def _labelled(spec: ModelSpec, events: int, seed: int, attack_fraction: float):
    """(feature matrix, label, subtype) of a labelled telemetry sample; every event must featurize."""
    from workers import telemetry

    if spec.event_kind not in telemetry.KINDS:
        raise VariantError(f"{spec.manifest_path}: no telemetry generator for event_kind {spec.event_kind!r} "
                           f"(known: {', '.join(telemetry.supported_kinds())}): no labelled set to measure with")
    lab = telemetry.generate_labelled(spec.event_kind, events, seed=seed, attack_fraction=attack_fraction)
    fb = Featurizer(spec).featurize(lab.values)
    if fb.rejects:
        raise VariantError(f"{spec.manifest_path}: {len(fb.rejects)} generated events rejected "
                           f"(first: {fb.rejects[0]}); run sluice models check on the parent")
    return fb.matrix, lab.label, lab.subtype


def quality_report(parent: ModelSpec, variant: ModelSpec, *, events: int = HELDOUT_EVENTS, seed: int = HELDOUT_SEED,
                   attack_fraction: float = HELDOUT_ATTACK_FRACTION) -> dict:
    """Score one labelled sample with parent and variant (onnxruntime, CPU) and compare them."""
    from workers import telemetry

    X, y, sub = _labelled(parent, events, seed, attack_fraction)
    sp = _score(_backend(parent), X)
    sv = _score(_backend(variant), X)
    fig = compare_scores(sp, sv, y, sub, parent.threshold, telemetry.KINDS[parent.event_kind].attacks)
    fig["heldout"] = {"events": int(events), "seed": int(seed), "attack_fraction": float(attack_fraction),
                      "event_kind": parent.event_kind, "batch_rows": SCORING_BATCH}
    return fig


# ----------------------------------------------------------------------------- making a variant


def _import_onnx():
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise VariantError(f"sluice models quantize needs onnx and onnxruntime: pip install 'sluice[quantize,cpu]' ({e})") from None
    return onnx


def _fp16(model):
    """The graph in float16, inputs and outputs kept float32 (Cast nodes at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return _topological(convert_float_to_float16(model, keep_io_types=True))


def _topological(model):
    """Nodes in dependency order: the float16 converter appends its input Casts after their
    consumers, which onnxruntime accepts but the ONNX checker (and other runtimes) reject."""
    g = model.graph
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise VariantError(f"the converted graph has a cycle or an undefined input at node {rest[0].name!r}")
        for n in done:
            ready.update(n.output)
        ordered += done
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
    return model


class _Calibration:
    """CalibrationDataReader over a feature matrix in fixed-size batches."""

    def __init__(self, input_name: str, matrix: np.ndarray, batch: int = CALIBRATION_BATCH):
        self._it = iter([{input_name: matrix[i:i + batch]} for i in range(0, len(matrix), batch)])

    def get_next(self):
        """The next {input: batch}, None when done (onnxruntime's CalibrationDataReader protocol)."""
        return next(self._it, None)


def _int8_static(src: pathlib.Path, work: pathlib.Path, spec: ModelSpec, matrix: np.ndarray, per_channel: bool,
                 exclude: list[str]):
    import onnx
    from onnxruntime import quantization as q

    class Reader(_Calibration, q.CalibrationDataReader):
        pass

    pre = work / "preprocessed.onnx"
    # shape inference + graph optimizations, as ORT recommends; ONNX's own shape inference covers
    # these graphs, so the symbolic pass (transformer-style dynamic shapes; needs sympy) is skipped
    q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    out = work / "int8.onnx"
    q.quantize_static(str(pre), str(out), Reader(spec.input_name, matrix), quant_format=q.QuantFormat.QDQ,
                      per_channel=per_channel, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                      calibrate_method=q.CalibrationMethod.MinMax, nodes_to_exclude=exclude or None)
    return onnx.load(str(out))


def gemm_to_matmul(model):
    """Rewrite Gemm (alpha = beta = 1, A not transposed, B an initializer) as MatMul + Add.

    ONNX Runtime's dynamic quantization handles MatMul but not Gemm; without this rewrite it
    would leave the shipped MLPs untouched and call the result INT8.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes = []
    for n in g.node:
        if n.op_type != "Gemm":
            nodes.append(n)
            continue
        at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0 or at.get("transA", 0) or n.input[1] not in inits:
            nodes.append(n)
            continue
        b = numpy_helper.to_array(inits[n.input[1]])
        if at.get("transB", 0):
            b = b.T
        bname = f"{n.input[1]}__matmul"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b), bname))
        has_c = len(n.input) > 2 and n.input[2]
        mm_out = f"{n.output[0]}__matmul" if has_c else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], bname], [mm_out], name=f"{n.name}/MatMul"))
        if has_c:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}/Add"))
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model


def _int8_dynamic(src: pathlib.Path, work: pathlib.Path, per_channel: bool, exclude: list[str]):
    import onnx
    from onnxruntime import quantization as q

    mm = work / "matmul.onnx"
    onnx.save(gemm_to_matmul(onnx.load(str(src))), str(mm))
    out = work / "int8.onnx"
    q.quantize_dynamic(str(mm), str(out), per_channel=per_channel, weight_type=q.QuantType.QInt8,
                       nodes_to_exclude=exclude or None)
    return onnx.load(str(out))


def _rel(p: pathlib.Path) -> str:
    """A path as the manifest writes it: relative to the repository root when inside it."""
    p = p.resolve()
    try:
        return str(p.relative_to(repo_root().resolve()))
    except ValueError:
        return str(p)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise VariantError(f"cannot write {v!r} to a manifest")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string with these characters is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise VariantError(f"cannot write {type(v).__name__} to a manifest")


def _toml_tables(prefix: str, d: dict) -> list[str]:
    lines = [f"[{prefix}]"] + [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += [""] + _toml_tables(f"{prefix}.{k}", v)
    return lines


def _variant_manifest(parent: ModelSpec, version: str, table: dict) -> str:
    """The parent's manifest text (comments kept) as a variant's: version, schema path, artifacts, [variant].

    Edited line by line, then parsed back and compared with the parent's parsed manifest, so an
    unusual layout fails here instead of producing a different contract.
    """
    text = parent.manifest_path.read_text()
    pdoc = tomllib.loads(text)
    schema = _rel(parent.schema_path) if parent.schema_path is not None else None
    out = [f"# The {table['precision']} variant of {parent.name} {parent.version}, made by `sluice models quantize`",
           "# from the manifest below: change the parent and quantize again rather than editing this copy.", ""]
    section = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("["):
            section = s.split("#", 1)[0].strip()
        if section is None and re.match(r"version\s*=", s):
            line = f"version = {_toml_value(version)}"
        elif section is None and schema is not None and re.match(r"event_schema\s*=", s):
            line = f"event_schema = {_toml_value(schema)}   # the parent's schema"
        elif section == "[artifacts]" and re.match(r"torch_(module|weights)\s*=", s):
            continue  # a variant ships its ONNX graph only
        out.append(line)
    out += ["", "# The parent, the precision and method, and the tolerance this variant promises against the",
            "# parent (checked by `sluice models check` on fresh events; the figures are in quality.json)."]
    out += _toml_tables("variant", table)
    new = "\n".join(out) + "\n"
    ndoc = tomllib.loads(new)
    want = dict(pdoc, version=version)
    want["artifacts"] = {k: v for k, v in pdoc["artifacts"].items() if k not in ("torch_module", "torch_weights")}
    if schema is not None:
        want["event_schema"] = schema
    got = {k: v for k, v in ndoc.items() if k != "variant"}
    if got != want or ndoc.get("variant") != table:
        raise VariantError(f"{parent.manifest_path}: could not rewrite it as a variant's manifest (keys "
                           f"{sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))} differ); "
                           f"put 'version' and 'event_schema' on lines of their own before the first table")
    return new


def _holds_variant(folder: pathlib.Path) -> bool:
    """Whether a folder's manifest has a [variant] table (well-formed or not)."""
    try:
        return "variant" in tomllib.loads((folder / "manifest.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


@dataclasses.dataclass
class QuantizeResult:
    """What ``quantize`` made: the folder, its manifest's [variant] table and the quality report."""

    path: pathlib.Path
    variant: dict
    quality: dict
    violations: list[str]
    written: bool


def quantize(model: str | pathlib.Path, precision: str, out: str | pathlib.Path, *, method: str = "auto",
             calibration_events: int = CALIBRATION_EVENTS, calibration_seed: int = CALIBRATION_SEED,
             heldout_events: int = HELDOUT_EVENTS, heldout_seed: int = HELDOUT_SEED, per_channel: bool = True,
             exclude: Iterable[str] = (), tolerance: dict[str, float] | None = None, force: bool = False,
             keep_failing: bool = False) -> QuantizeResult:
    """Make a variant folder of ``model`` at ``out`` and its quality report; see the module docstring.

    ``method``: ``auto`` (fp16-convert for fp16; int8-static when telemetry can calibrate the
    model's event kind, else int8-dynamic), ``static`` or ``dynamic`` (int8 only).
    The folder is built beside ``out`` and moved into place only when the quality report is
    within ``tolerance`` (defaults per precision: DEFAULT_TOLERANCE), unless ``keep_failing``.
    """
    from workers import telemetry

    onnx = _import_onnx()
    from onnxruntime import __version__ as ort_version
    if precision not in PRECISIONS:
        raise VariantError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if method not in ("auto", "static", "dynamic"):
        raise VariantError(f"--method {method!r}: use auto, static or dynamic")
    if precision == "fp16" and method != "auto":
        raise VariantError(f"--method {method}: applies to int8 only (fp16 converts the graph)")
    for flag, n in (("--calibration-events", calibration_events), ("--heldout-events", heldout_events)):
        if not isinstance(n, int) or n < 100:
            raise VariantError(f"{flag} {n!r}: at least 100 events are needed")
    if calibration_seed == heldout_seed:
        raise VariantError(f"--calibration-seed and --heldout-seed are both {heldout_seed}: the held-out set must not "
                           f"be the calibration sample")
    try:
        parent = ModelSpec.load(model)
    except ValueError as e:
        raise VariantError(f"--model: {e}") from None
    if read_variant(parent.path) is not None:
        raise VariantError(f"--model {model}: is itself a variant; quantize its FP32 parent instead")
    tol = dict(DEFAULT_TOLERANCE[precision])
    for k, v in (tolerance or {}).items():
        if k not in TOLERANCE_KEYS:
            raise VariantError(f"--tolerance {k}: unknown key (known: {', '.join(TOLERANCE_KEYS)})")
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise VariantError(f"--tolerance {k}={v!r}: must be a finite number >= 0")
        tol[k] = float(v)
    out = pathlib.Path(out)
    if out.resolve() == parent.path.resolve():
        raise VariantError(f"--out {out}: is the parent's own folder; choose a new folder (e.g. {parent.path}_{precision})")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise VariantError(f"--out {out}: exists and is not empty; pass --force to replace a variant there")
        if not _holds_variant(out):
            raise VariantError(f"--out {out}: holds something other than a variant; --force replaces variants only")

    if precision == "fp16":
        kind = "fp16-convert"
    elif method == "dynamic" or (method == "auto" and parent.event_kind not in telemetry.KINDS):
        kind = "int8-dynamic"
    else:
        kind = "int8-static"
    exclude = list(exclude)
    version = f"{parent.version}+{precision}"

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    build = work / "build"  # intermediate graphs (pre-processed, Gemm rewritten), dropped at the end
    build.mkdir(parents=True)
    try:
        calibration = None
        if kind == "fp16-convert":
            m = _fp16(onnx.load(str(parent.onnx_path)))
        elif kind == "int8-static":
            Xc, _, _ = _labelled(parent, calibration_events, calibration_seed, CALIBRATION_ATTACK_FRACTION)
            m = _int8_static(parent.onnx_path, build, parent, Xc, per_channel, exclude)
            calibration = {"events": calibration_events, "seed": calibration_seed,
                           "attack_fraction": CALIBRATION_ATTACK_FRACTION, "method": "minmax",
                           "format": "qdq", "per_channel": per_channel}
        else:
            m = _int8_dynamic(parent.onnx_path, build, per_channel, exclude)
            calibration = {"events": 0, "per_channel": per_channel,
                           "note": "dynamic: activations are quantized per call from each batch's range"}
        if exclude:
            calibration = dict(calibration or {}, kept_float=exclude)
        meta = {p.key: p.value for p in onnx.load(str(parent.onnx_path), load_external_data=False).metadata_props}
        meta.update(version=version, precision=precision, method=kind, parent_version=parent.version,
                    parent_sha256=sha256_file(parent.onnx_path))
        del m.metadata_props[:]
        for k, v in meta.items():
            m.metadata_props.add(key=k, value=str(v))
        onnx.checker.check_model(m)
        shutil.rmtree(build)
        onnx.save(m, str(work / parent.onnx_path.name))

        table = {
            "precision": precision,
            "method": kind,
            # dynamic quantization scales activations from each call's rows, so an event's score
            # depends on its batch (the worker's batch-invariance rule does not hold)
            "batch_invariant": kind != "int8-dynamic",
            "tool": f"onnxruntime {ort_version}, onnx {onnx.__version__}",
            "parent": {"path": _rel(parent.path), "name": parent.name, "version": parent.version,
                       "sha256": _parent_hashes(parent)},
            "tolerance": tol,
        }
        if calibration is not None:
            table["calibration"] = calibration
        (work / "manifest.toml").write_text(_variant_manifest(parent, version, table))
        bdoc = json.loads(parent.baseline_path.read_text())
        bdoc["version"] = version
        bdoc["variant"] = {"precision": precision, "parent_version": parent.version,
                           "note": "features and score reference are the parent's (the FP32 training distribution); "
                                   "quality.json has the variant's score shift (score_psi)"}
        (work / parent.baseline_path.name).write_text(json.dumps(bdoc, indent=1) + "\n")

        vspec = ModelSpec.load(work)
        q = quality_report(parent, vspec, events=heldout_events, seed=heldout_seed)
        report = {
            "model": parent.name,
            "variant": {"version": version, "precision": precision, "method": kind,
                        "sha256": sha256_file(vspec.onnx_path), "bytes": vspec.onnx_path.stat().st_size},
            "parent": {"path": _rel(parent.path), "version": parent.version,
                       "sha256": sha256_file(parent.onnx_path), "bytes": parent.onnx_path.stat().st_size},
            "calibration": calibration,
            "tolerance": tol,
            **q,
        }
        bad = violations(q, tol)
        report["within_tolerance"] = not bad
        (work / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
        if bad and not keep_failing:
            return QuantizeResult(out, table, report, bad, written=False)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        return QuantizeResult(out, table, report, bad, written=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- check


def check_variant(spec: ModelSpec, variant: Variant, rep, events: int, seed: int) -> None:
    """Add a variant's checks to a models.CheckReport: parent, quality report, tolerance, batch invariance."""
    pdir = variant.parent_folder()
    try:
        parent = ModelSpec.load(pdir)
    except ValueError as e:
        rep.add("variant parent", False, f"[variant.parent] path {variant.parent_path!r}: {e}")
        return
    problems = []
    if parent.name != variant.parent_name or parent.version != variant.parent_version:
        problems.append(f"the parent at {pdir} is {parent.name} {parent.version}, the manifest names "
                        f"{variant.parent_name} {variant.parent_version}")
    if spec.name != parent.name:
        problems.append(f"name {spec.name!r} differs from the parent's {parent.name!r} (drift and lineage group by name)")
    if spec.version != f"{parent.version}+{variant.precision}":
        problems.append(f"version {spec.version!r} is not the parent's + '+{variant.precision}'")
    if spec.features != parent.features or (spec.input_name, spec.output_name, spec.threshold) != (
            parent.input_name, parent.output_name, parent.threshold):
        problems.append("features, ONNX input/output names or threshold differ from the parent's")
    rep.add("variant parent", not problems, "; ".join(problems) if problems else
            f"{variant.precision} ({variant.method}) of {parent.name} {parent.version} at {_rel(pdir)}")
    have = _parent_hashes(parent)
    changed = [f"{k} ({have[k][:12]}…, the variant was made from {variant.parent_sha256.get(k, '?')[:12]}…)"
               for k in ("manifest", "model", "baseline") if have[k] != variant.parent_sha256.get(k)]
    rep.add("variant parent sha256", not changed,
            ("the parent changed since this variant was made: " + ", ".join(changed)
             + "; re-run sluice models quantize") if changed else "manifest, model and baseline as quantized")

    qpath = spec.path / "quality.json"
    try:
        qdoc = json.loads(qpath.read_text())
        own = sha256_file(spec.onnx_path) if spec.onnx_path.is_file() else None
        qbad = []
        if qdoc["variant"]["version"] != spec.version:
            qbad.append(f"it is for version {qdoc['variant']['version']!r}")
        if qdoc["variant"]["sha256"] != own:
            qbad.append(f"it measured another {spec.onnx_path.name} (sha256 {qdoc['variant']['sha256'][:12]}…)")
        qbad += violations(qdoc, variant.tolerance)
        rep.add("variant quality report", not qbad, "quality.json: " + ("; ".join(qbad) if qbad else
                f"AUC {qdoc['auc']['parent']:.5f} -> {qdoc['auc']['variant']:.5f}, flip_rate {qdoc['flip_rate']:.4%}, "
                f"max |diff| {qdoc['max_abs_diff']:.2e} on {qdoc['events']} held-out events"))
    except FileNotFoundError:
        rep.add("variant quality report", False, f"{qpath} is missing; re-run sluice models quantize")
    except (OSError, ValueError, KeyError, TypeError) as e:
        rep.add("variant quality report", False, f"{qpath}: unreadable ({type(e).__name__}: {e}); re-run sluice models quantize")

    # fresh events, neither the calibration sample nor the quality report's held-out set
    fresh_seed = seed + CHECK_SEED_OFFSET
    try:
        from workers import telemetry

        X, y, sub = _labelled(parent, events, fresh_seed, HELDOUT_ATTACK_FRACTION)
        pb, vb = _backend(parent), _backend(spec)
        fig = compare_scores(_score(pb, X), _score(vb, X), y, sub, parent.threshold,
                             telemetry.KINDS[parent.event_kind].attacks)
    except Exception as e:  # noqa: BLE001 - any failure to score is this check's failure, named
        rep.add("variant vs parent", False, f"could not score fresh events: {type(e).__name__}: {e}")
        return
    where = f"on {fig['events']} fresh events (seed {fresh_seed})"
    for k in TOLERANCE_KEYS:
        x, bound = fig[k], variant.tolerance[k]
        ok = x is not None and x <= bound
        pct = k == "flip_rate"
        shown = "undefined" if x is None else f"{x:.4%}" if pct else f"{x:.3g}"
        rep.add(f"variant vs parent: {k}", ok, f"{shown} {'<=' if ok else '>'} {f'{bound:.4%}' if pct else f'{bound:g}'} {where}"
                + ("" if ok else f" (manifest [variant.tolerance] {k})"))

    rows = X[:INVARIANCE_ROWS]
    together = vb.infer(rows)
    alone = np.concatenate([vb.infer(rows[i:i + 1]) for i in range(len(rows))])
    d = float(np.max(np.abs(together - alone))) if len(rows) else 0.0
    if variant.batch_invariant:
        rep.add("variant batch invariance", d == 0.0,
                f"max |diff| {d:.2e} between one batch of {len(rows)} and one row at a time")
    else:
        rep.add("variant batch invariance", None,
                f"the manifest says batch_invariant = false ({variant.method}): scores depend on the batch "
                f"(max |diff| {d:.2e} between one batch of {len(rows)} and one row at a time)")
