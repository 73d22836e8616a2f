#!/usr/bin/env python
"""Train the auth anomaly detector: unlabelled sign-ins -> features -> autoencoder -> model.onnx + model.pt + baseline.json.

    python models/auth_anomaly/train.py [--seed 0] [--out DIR]

Unsupervised: the autoencoder is fitted on an unlabelled stream of sign-ins
(``attack_fraction`` 0.005, as production data would be: mostly benign, a few
attacks nobody labelled); labels are only used to report test metrics.
Features come from ``workers.features.Featurizer`` over ``manifest.toml``, the
exact code the worker serves with; the module is defined in ``model.py``
(shared with the torch backend).

Calibration (inside the module, so every backend gives the same score): with
e the reconstruction error, ``score = sigmoid(k * (ln(e + 1e-6) - ln(e_ref)))``;
``e_ref`` is the 99th percentile of e on a held-out unlabelled stream (so the
threshold 0.5 flags ~1% of that stream), ``k`` puts its median at 0.02.

Deterministic for a given seed (numpy + torch seeds,
``torch.use_deterministic_algorithms``, one thread). Needs the ``train`` extra:
``pip install torch==2.13.0 onnx`` (CPU build). About a minute on 2 CPU cores.
baseline.json: see models/flow_classifier/train.py for the format.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

from workers import telemetry  # noqa: E402
from workers.features import Featurizer, ModelSpec  # noqa: E402
from workers.training import deterministic_torch, feature_baseline, featurize, metrics, score_baseline, stamp_onnx  # noqa: E402

N_TRAIN = 200_000
N_CALIB = 40_000
N_BASELINE = 100_000
N_TEST = 40_000
EPOCHS = 8
BATCH = 512
LR = 3e-3
CONTAMINATION = 0.005       # unlabelled attacks in the training stream
CALIB_QUANTILE = 0.99       # e_ref: this quantile of held-out errors scores 0.5
MEDIAN_SCORE = 0.02         # the median held-out error scores this


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="training seed (data and weights)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE, help="where to write model.onnx, model.pt and baseline.json")
    ap.add_argument("--train-size", type=int, default=N_TRAIN)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    args = ap.parse_args(argv)

    torch = deterministic_torch(args.seed)
    if torch is None:
        return 2
    t0 = time.perf_counter()

    spec = ModelSpec.load(HERE)
    fz = Featurizer(spec)
    s = args.seed * 10
    tr = telemetry.generate_labelled(spec.event_kind, args.train_size, seed=s + 1, attack_fraction=CONTAMINATION)
    ca = telemetry.generate_labelled(spec.event_kind, N_CALIB, seed=s + 2, attack_fraction=CONTAMINATION)
    bl = telemetry.generate_labelled(spec.event_kind, N_BASELINE, seed=s + 3, attack_fraction=0.05)
    X = featurize(fz, tr.values).matrix
    Xc = featurize(fz, ca.values).matrix
    fb_bl = featurize(fz, bl.values)
    print(f"data: train {X.shape} (unlabelled, {tr.label.mean():.2%} attacks), calib {Xc.shape}, "
          f"baseline {fb_bl.matrix.shape} in {time.perf_counter() - t0:.1f}s")

    from workers.models import load_definition

    definition = load_definition(spec)
    model = definition.build(spec.n_columns)
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr=LR)
    Xt = torch.from_numpy(X)
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * ((len(X) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(X), generator=gen)
        total = 0.0
        for i in range(0, len(X), BATCH):
            xb = Xt[perm[i : i + BATCH]]
            opt.zero_grad()
            loss = model.error(xb).mean()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(xb)
        print(f"epoch {epoch + 1}/{args.epochs}: reconstruction mse {total / len(X):.5f}")

    model.eval()
    with torch.no_grad():
        e = model.error(torch.from_numpy(Xc)).numpy().astype(np.float64)
    log_ref = math.log(float(np.quantile(e, CALIB_QUANTILE)) + 1e-6)
    log_med = math.log(float(np.median(e)) + 1e-6)
    k = math.log(MEDIAN_SCORE / (1 - MEDIAN_SCORE)) / (log_med - log_ref)
    model.log_e_ref.fill_(log_ref)
    model.k.fill_(k)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), str(args.out / spec.torch_weights_path.name))
    onnx_path = args.out / spec.onnx_path.name
    torch.onnx.export(
        model, (torch.zeros(2, spec.n_columns),), str(onnx_path), dynamo=False, opset_version=17,
        input_names=[spec.input_name], output_names=[spec.output_name],
        dynamic_axes={spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}},
        do_constant_folding=True,
    )
    stamp_onnx(onnx_path, spec, "sluice/models/auth_anomaly/train.py")

    from workers.inference import create_backend

    served = ModelSpec.load(HERE)
    if args.out.resolve() != HERE.resolve():
        import dataclasses

        served = dataclasses.replace(served, onnx_path=onnx_path, baseline_path=args.out / spec.baseline_path.name)
    backend = create_backend(served, "onnxruntime", "cpu", threads=1)
    with torch.no_grad():
        torch_scores = model(torch.from_numpy(Xc)).numpy()
    max_diff = float(np.abs(torch_scores - backend.infer(Xc)).max())
    if max_diff > 1e-5:
        raise SystemExit(f"ONNX export differs from torch by {max_diff}")

    bl_scores = backend.infer(fb_bl.matrix)
    te = telemetry.generate_labelled(spec.event_kind, N_TEST, seed=s + 4, attack_fraction=0.05)
    te_scores = backend.infer(featurize(fz, te.values).matrix)
    per_sub = {name: round(float((te_scores[te.subtype == name] >= spec.threshold).mean()), 4)
               for name in sorted(set(te.subtype.tolist()))}
    baseline = {
        "model": spec.name,
        "version": spec.version,
        "columns": list(spec.columns),
        "features": feature_baseline(spec, fb_bl.raw),
        "score": {"name": spec.score_name, **score_baseline(bl_scores)},
        "reference": {"events": N_BASELINE, "seed": s + 3, "attack_fraction": 0.05, "drift": 0.0},
        "calibration": {"log_e_ref": round(log_ref, 6), "k": round(k, 6), "quantile": CALIB_QUANTILE,
                        "median_score": MEDIAN_SCORE, "calibration_events": N_CALIB},
        "training": {
            "seed": args.seed, "train_events": int(len(X)), "contamination": CONTAMINATION, "epochs": args.epochs,
            "hidden": list(definition.HIDDEN), "torch": torch.__version__.split("+")[0],
            "test_metrics": metrics(te.label, te_scores, spec.threshold),
            "test_flagged_share_by_subtype": per_sub,
        },
    }
    (args.out / spec.baseline_path.name).write_text(json.dumps(baseline, indent=1) + "\n")
    print(f"test: {json.dumps(baseline['training']['test_metrics'])}")
    print(f"flagged share by subtype: {json.dumps(per_sub)}")
    print(f"wrote {onnx_path}, model.pt and {args.out / spec.baseline_path.name} in {time.perf_counter() - t0:.1f}s "
          f"(torch vs onnxruntime max diff {max_diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
