"""``sluice bench-inference``: rows/s and p50/p99 latency per batch size, per backend and precision.

    sluice bench-inference --model models/flow_classifier                       # onnxruntime, cpu, fp32
    sluice bench-inference --model models/flow_classifier --device cuda \\
        --backend onnxruntime,onnxruntime-tensorrt,tensorrt,torch --precision fp32,fp16,tf32 --json

Each (backend, precision) pair is created the way the worker creates it (``create_backend``,
so PaddedRows and the engine caches are in the loop), warmed over the batch sizes, and timed by
``workers.offline.bench_inference`` on real featurized events. Precision is the backends' own
switch: ``fp16`` sets ``SLUICE_TENSORRT_FP16=1`` (TensorRT backends only), ``tf32`` sets
``SLUICE_GPU_ALLOW_TF32=1`` (GPU backends only), ``fp32`` neither. Each run also reports its
quality against ONNX Runtime on the CPU in FP32 over the same events: the largest score
difference and how many labels flip at the model's threshold, so a faster precision is never
read without its cost. A pair that cannot run here (not installed, no GPU, a precision the
backend does not have) is listed with the reason instead of stopping the others.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import numpy as np

#: precision name -> environment the backends read at creation (gpu_common)
PRECISIONS = {
    "fp32": {},
    "fp16": {"SLUICE_TENSORRT_FP16": "1"},
    "tf32": {"SLUICE_GPU_ALLOW_TF32": "1"},
}
#: which backends have which precision switch (fp32 is everywhere)
_FP16_BACKENDS = ("tensorrt", "onnxruntime-tensorrt")

#: events scored for the quality columns: enough for label flips near the threshold to show
QUALITY_ROWS = 4096


@contextlib.contextmanager
def _precision_env(precision: str) -> Iterator[None]:
    """Set exactly the precision's switches while a backend is created, then restore the environment."""
    # NVIDIA_TF32_OVERRIDE: a GPU backend created for fp32 sets it for the process; a later tf32 run
    # must not inherit it (libraries that read it once per process may still keep the first value:
    # for exact tf32 numbers bench tf32 alone, as the README's command does per precision)
    keys = {k for env in PRECISIONS.values() for k in env} | {"NVIDIA_TF32_OVERRIDE"}
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for k in keys:
            os.environ.pop(k, None)
        os.environ.update(PRECISIONS[precision])
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unsupported(backend: str, device: str, precision: str) -> str | None:
    """Why a (backend, device, precision) has no meaning, or None."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}"
    if precision == "fp16" and backend not in _FP16_BACKENDS:
        return f"fp16 is a TensorRT switch ({', '.join(_FP16_BACKENDS)})"
    if precision == "tf32" and device == "cpu":
        return "tf32 exists on NVIDIA GPUs only"
    return None


def _events(spec, n: int, seed: int) -> np.ndarray:
    from workers import telemetry
    from workers.features import Featurizer

    if spec.event_kind in telemetry.KINDS:
        values = [v for _, v, _ in telemetry.generate(spec.event_kind, n, seed=seed, start_ts=1.79e9, attack_fraction=0.2)]
        return Featurizer(spec).featurize(values).matrix
    return np.random.default_rng(seed).standard_normal((n, spec.n_columns)).astype(np.float32)


def bench_engines(spec, backends: Sequence[str], device: str, precisions: Sequence[str],
                  batch_sizes: Sequence[int], seconds: float = 1.0, threads: int = 1, seed: int = 7) -> dict:
    """Bench every (backend, precision) on ``device``; returns {"model", "version", "device", "runs": [...]}.

    A run is {"backend", "device", "precision", "describe", "quality", "results"} with one result
    per batch size (``workers.offline.bench_inference``'s rows), or {"backend", "device",
    "precision", "error"} when it cannot run here.
    """
    from workers.inference import BackendUnavailable, create_backend
    from workers.offline import bench_inference

    x = _events(spec, QUALITY_ROWS, seed + 1)
    ref = create_backend(spec, "onnxruntime", "cpu").infer(x)
    runs = []
    for backend in backends:
        for precision in precisions:
            run = {"backend": backend, "device": device, "precision": precision}
            why = unsupported(backend, device, precision)
            if why:
                runs.append({**run, "error": why})
                continue
            try:
                with _precision_env(precision):
                    b = create_backend(spec, backend, device, threads=threads)
                results = bench_inference(spec, b, list(batch_sizes), seconds=seconds, seed=seed)
                got = b.infer(x)
            except (BackendUnavailable, ValueError, RuntimeError) as e:
                runs.append({**run, "error": str(e)})
                continue
            flips = int(np.sum((got >= spec.threshold) != (ref >= spec.threshold)))
            run.update(describe=b.describe(), results=results, quality={
                "reference": "onnxruntime cpu fp32", "events": int(len(x)),
                "max_abs_diff": float(np.max(np.abs(got - ref))) if len(x) else 0.0,
                "label_flips": flips, "threshold": spec.threshold})
            close = getattr(b, "close", None)
            if close is not None:
                close()
            runs.append(run)
    return {"model": spec.name, "version": spec.version, "device": device, "threads": threads, "runs": runs}


def format_table(result: dict) -> str:
    """The bench as a text table: one line per backend, precision and batch size."""
    lines = [f"bench-inference: {result['model']} {result['version']} on {result['device']} "
             f"(threads={result['threads']})",
             f"{'backend':<21} {'prec':<9} {'batch':>6} {'rows/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'us/row':>8}"]
    for run in result["runs"]:
        head = f"{run['backend']:<21} {run['precision']:<9}"
        if "error" in run:
            lines.append(f"{head} {'-':>6}  not run: {run['error']}")
            continue
        for r in run["results"]:
            lines.append(f"{head} {r['batch_size']:>6} {r['rows_per_s']:>12,.0f} {r['latency_ms_p50']:>9.3f} "
                         f"{r['latency_ms_p99']:>9.3f} {r['latency_us_per_row']:>8.3f}")
        q = run["quality"]
        lines.append(f"{head} quality vs {q['reference']}: max |diff| {q['max_abs_diff']:.2e}, "
                     f"{q['label_flips']} of {q['events']} labels flip at {q['threshold']}")
    return "\n".join(lines)


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def run_cli(args) -> int:
    """``sluice bench-inference``: parse the comma lists, bench, print the table or ``--json``.

    Exit 0 when at least one pair ran, 2 when none could (the table says why).
    """
    import json
    import sys

    from workers.features import ModelSpec

    try:
        spec = ModelSpec.load(args.model)
        sizes = [int(s) for s in _split(args.batch_sizes)]
    except ValueError as e:
        print(f"sluice: cannot load the model: {e}", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 1:
        print("sluice bench-inference: --batch-sizes needs positive integers", file=sys.stderr)
        return 2
    result = bench_engines(spec, _split(getattr(args, "backends", None) or args.backend), args.device, _split(getattr(args, "precision", "fp32")),
                           sizes, seconds=args.seconds, threads=args.threads)
    ran = [r for r in result["runs"] if "error" not in r]
    if ran:  # the single-engine shape earlier versions printed, kept for scripts that read it
        result["backend"], result["results"] = ran[0]["describe"], ran[0]["results"]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    for r in result["runs"]:
        if "error" in r:
            print(f"sluice bench-inference: {r['backend']} {r['precision']} on {r['device']}: {r['error']}", file=sys.stderr)
    return 0 if ran else 2
