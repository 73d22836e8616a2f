#!/usr/bin/env python
"""Train the flow classifier: labelled synthetic flows -> features -> MLP -> model.onnx + baseline.json.

    python models/flow_classifier/train.py [--seed 0] [--out DIR]

The module is defined in ``model.py`` (shared with the torch backend); this
script writes model.onnx, model.pt (its state_dict) and baseline.json.

Features come from ``workers.features.Featurizer`` over ``manifest.toml``: the
exact code the worker serves with. Training is deterministic for a given seed
(numpy + torch seeds, ``torch.use_deterministic_algorithms``, one thread), so
rerunning it reproduces the committed artifacts. Needs the ``train`` extra:
``pip install torch==2.13.0 onnx`` (CPU build). Runs in well under 2 minutes on
2 CPU cores.

baseline.json holds the serving-time reference distribution, measured on a
fresh sample drawn like the demo/production stream (attack_fraction 0.05,
drift 0):

* per manifest feature, on ``FeatureBatch.raw`` (the value *before* transforms;
  for categorical features the category code):
  - numeric: ``edges`` = interior cut points of 10 quantile bins (duplicates
    removed, so discrete features may have fewer bins); a value x falls in bin
    ``searchsorted(edges, x, side="right")``; ``frequencies`` has
    ``len(edges) + 1`` entries;
  - categorical: ``codes`` with their ``labels``; bin i counts code
    ``codes[i]``, the last bin counts any other code: ``frequencies`` has
    ``len(codes) + 1`` entries;
  - ``missing_rate``: share of events where the field was absent (defaulted);
* ``score``: 10 equal-width bins on [0, 1] (``edges`` has the 11 bounds, the
  last bin includes 1.0) and their frequencies.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# one thread before numpy/torch start their pools: determinism and the 2-core budget
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

from workers import telemetry  # noqa: E402
from workers.features import Featurizer, ModelSpec  # noqa: E402
from workers.training import deterministic_torch, auc, feature_baseline, featurize, metrics, score_baseline, stamp_onnx  # noqa: E402

N_TRAIN = 240_000
N_VALID = 40_000
N_BASELINE = 100_000
EPOCHS = 6
BATCH = 512
LR = 3e-3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="training seed (data and weights)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE, help="where to write model.onnx and baseline.json")
    ap.add_argument("--train-size", type=int, default=N_TRAIN)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    args = ap.parse_args(argv)

    torch = deterministic_torch(args.seed)
    if torch is None:
        return 2
    t0 = time.perf_counter()

    spec = ModelSpec.load(HERE)
    fz = Featurizer(spec)
    # disjoint seeds for train / validation / baseline / test data
    s = args.seed * 10
    tr = telemetry.generate_labelled(spec.event_kind, args.train_size, seed=s + 1, attack_fraction=0.25)
    va = telemetry.generate_labelled(spec.event_kind, N_VALID, seed=s + 2, attack_fraction=0.05)
    bl = telemetry.generate_labelled(spec.event_kind, N_BASELINE, seed=s + 3, attack_fraction=0.05)
    X = featurize(fz, tr.values).matrix
    y = tr.label.astype(np.float32)
    Xv = featurize(fz, va.values).matrix
    fb_bl = featurize(fz, bl.values)
    print(f"data: train {X.shape} ({y.mean():.1%} attacks), valid {Xv.shape}, baseline {fb_bl.matrix.shape} "
          f"in {time.perf_counter() - t0:.1f}s")

    # the module is defined once, in model.py, for training and the torch backend
    from workers.models import load_definition

    scorer = load_definition(spec).build(spec.n_columns)
    net = scorer.body
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(args.seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * ((len(X) + BATCH - 1) // BATCH))
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(X), generator=gen)
        total = 0.0
        for i in range(0, len(X), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad()
            loss = loss_fn(net(Xt[idx]).squeeze(-1), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        net.eval()
        with torch.no_grad():
            sv = torch.sigmoid(net(torch.from_numpy(Xv)).squeeze(-1)).numpy()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(X):.4f}  valid auc {auc(va.label, sv):.4f}")

    scorer.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    # the trained weights for the torch backend (plain state_dict; torch.load(weights_only=True))
    torch.save(scorer.state_dict(), str(args.out / spec.torch_weights_path.name))
    onnx_path = args.out / spec.onnx_path.name
    example = torch.zeros(2, spec.n_columns)
    torch.onnx.export(
        scorer, (example,), str(onnx_path), dynamo=False, opset_version=17,
        input_names=[spec.input_name], output_names=[spec.output_name],
        dynamic_axes={spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}},
        do_constant_folding=True,
    )
    stamp_onnx(onnx_path, spec, "sluice/models/flow_classifier/train.py")

    # everything below scores with the exported ONNX through the serving backend
    from workers.inference import create_backend

    served = ModelSpec.load(HERE)
    if args.out.resolve() != HERE.resolve():
        import dataclasses

        served = dataclasses.replace(served, onnx_path=onnx_path, baseline_path=args.out / spec.baseline_path.name)
    backend = create_backend(served, "onnxruntime", "cpu", threads=1)
    with torch.no_grad():
        torch_scores = scorer(torch.from_numpy(Xv)).numpy()
    ort_scores = backend.infer(Xv)
    max_diff = float(np.abs(torch_scores - ort_scores).max())
    if max_diff > 1e-5:
        raise SystemExit(f"ONNX export differs from torch by {max_diff}")

    bl_scores = backend.infer(fb_bl.matrix)
    te = telemetry.generate_labelled(spec.event_kind, N_VALID, seed=s + 4, attack_fraction=0.05)
    te_scores = backend.infer(featurize(fz, te.values).matrix)
    per_attack = {}
    for name in sorted(set(te.subtype.tolist())):
        m = te.subtype == name
        per_attack[name] = round(float((te_scores[m] >= spec.threshold).mean()), 4)
    baseline = {
        "model": spec.name,
        "version": spec.version,
        "columns": list(spec.columns),
        "features": feature_baseline(spec, fb_bl.raw),
        "score": {"name": spec.score_name, **score_baseline(bl_scores)},
        "reference": {"events": N_BASELINE, "seed": s + 3, "attack_fraction": 0.05, "drift": 0.0},
        "training": {
            "seed": args.seed, "train_events": int(len(X)), "epochs": args.epochs, "hidden": list(load_definition(spec).HIDDEN),
            "torch": torch.__version__.split("+")[0],
            "test_metrics": metrics(te.label, te_scores, spec.threshold),
            "test_flagged_share_by_subtype": per_attack,
        },
    }
    (args.out / spec.baseline_path.name).write_text(json.dumps(baseline, indent=1) + "\n")
    print(f"test: {json.dumps(baseline['training']['test_metrics'])}")
    print(f"flagged share by subtype: {json.dumps(per_attack)}")
    print(f"wrote {onnx_path} and {args.out / spec.baseline_path.name} in {time.perf_counter() - t0:.1f}s "
          f"(torch vs onnxruntime max diff {max_diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
