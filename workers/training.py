"""Helpers shared by the models' train.py scripts (evaluation and baseline.json).

The baseline format is documented in ``models/flow_classifier/train.py``: per
feature (on ``FeatureBatch.raw``) quantile bins or category codes with their
frequencies and missing rate, and 10 equal-width score bins on [0, 1].
"""

from __future__ import annotations

import sys

import numpy as np

from workers.features import FeatureBatch, Featurizer, ModelSpec

SCORE_BINS = 10
FEATURE_BINS = 10


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC via the rank-sum (Mann-Whitney U) statistic, ties averaged."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    _, start, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(start + (counts - 1) / 2.0 + 1.0, counts)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    return float((ranks[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict:
    y = np.asarray(y).astype(bool)
    pred = s >= threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return {
        "auc": round(auc(y, s), 6),
        "precision": round(tp / max(tp + fp, 1), 6),
        "recall": round(tp / max(tp + fn, 1), 6),
        "false_positive_rate": round(fp / max(int((~y).sum()), 1), 6),
        "n": int(len(y)),
        "positives": int(y.sum()),
    }


def deterministic_torch(seed: int):
    """Import torch set up for reproducible training (seeded, deterministic, one thread).

    Returns None, with the install hint on stderr, when torch is not installed.
    """
    try:
        import torch
    except ImportError:
        print("train.py needs torch: pip install torch==2.13.0 onnx  (CPU build)", file=sys.stderr)
        return None
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if hasattr(torch, "set_num_interop_threads"):
        torch.set_num_interop_threads(1)
    return torch


def featurize(fz: Featurizer, values: list[bytes]) -> FeatureBatch:
    """Featurize training data; generated training data must have no reject."""
    fb = fz.featurize(values)
    if fb.rejects:
        raise SystemExit(f"training data has {len(fb.rejects)} rejects, first: {fb.rejects[0]}")
    return fb


def feature_baseline(spec: ModelSpec, raw: np.ndarray) -> list[dict]:
    out = []
    for j, f in enumerate(spec.features):
        col = raw[:, j]
        missing = np.isnan(col)
        x = col[~missing]
        entry: dict = {"name": f.name, "source": f.source, "kind": f.kind,
                       "missing_rate": round(float(missing.mean()), 6) if len(col) else 0.0}
        if f.kind == "numeric":
            qs = np.quantile(x, np.linspace(0, 1, FEATURE_BINS + 1)[1:-1]) if len(x) else np.array([])
            edges = np.unique(np.round(qs, 6))
            counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
            entry.update(binning="quantile", value="raw", edges=[float(e) for e in edges],
                         min=float(x.min()) if len(x) else None, max=float(x.max()) if len(x) else None)
        else:
            cats = f.categories
            codes = np.unique(x.astype(np.int64)) if f.transform[-1].op == "flags" else np.arange(len(cats))
            idx = np.searchsorted(codes, x.astype(np.int64))
            idx = np.where((idx < len(codes)) & (codes[np.minimum(idx, len(codes) - 1)] == x), idx, len(codes))
            counts = np.bincount(idx, minlength=len(codes) + 1)
            entry.update(binning="category", value="code", codes=[int(c) for c in codes],
                         labels=[cats[int(c)] if int(c) < len(cats) else str(int(c)) for c in codes])
        total = max(int(counts.sum()), 1)
        entry["frequencies"] = [round(float(c) / total, 6) for c in counts]
        out.append(entry)
    return out


def score_baseline(scores: np.ndarray) -> dict:
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    idx = np.clip((scores * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
    counts = np.bincount(idx, minlength=SCORE_BINS)
    return {"binning": "equal_width", "edges": [round(float(e), 6) for e in edges],
            "frequencies": [round(float(c) / max(len(scores), 1), 6) for c in counts]}


def stamp_onnx(path, spec: ModelSpec, producer: str) -> None:
    """Record the model name/version/columns in the ONNX metadata (no timestamps: reproducible bytes)."""
    import onnx

    m = onnx.load(str(path))
    m.producer_name = producer
    m.model_version = int(spec.version.split(".")[0])
    del m.metadata_props[:]
    for k, v in (("model", spec.name), ("version", spec.version), ("score", spec.score_name),
                 ("columns", ",".join(spec.columns))):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
