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


# ----------------------------------------------------------------------------- the sweep
#
# ``sluice bench-inference --sweep``: every usable backend x precision x batch size of one model,
# with the quality each precision costs, as a table, JSON rows and a PNG (throughput against
# quality delta, p99 latency marked): the cost-quality-latency curve.
#
# Precisions are model variants (folders made by ``sluice models quantize``: a manifest naming
# the parent and the precision, a quality.json beside it) plus the engines' own switches on the
# FP32 model where a GPU backend has them (TensorRT FP16 kernels, TF32). FP32 is the model itself.

#: every (backend, device) the sweep considers; those not usable here are listed with the reason
SWEEP_ENGINES = (("onnxruntime", "cpu"), ("torch", "cpu"), ("onnxruntime", "cuda"),
                 ("onnxruntime-tensorrt", "cuda"), ("tensorrt", "cuda"), ("torch", "cuda"))
#: engine precision switches applied to the FP32 model: sweep label -> PRECISIONS key
ENGINE_SWITCHES = {"fp16-trt": "fp16", "tf32": "tf32"}
#: labelled held-out events each engine scores for the measured quality columns; the seed is
#: apart from the training seeds (train.py: small ones) and from workers/variants.py's calibration and
#: held-out seeds (90_001, 90_002): events none of the models or variants was fitted or reported on
SWEEP_QUALITY_ROWS = 8192
SWEEP_QUALITY_SEED = 90_021
#: quality.json figures the sweep reads (workers/quantize.py writes them)
QUALITY_FIELDS = ("flip_rate", "max_abs_diff", "p99_abs_diff")


class VariantError(ValueError):
    """A variant folder that cannot be used: a one-line reason naming the file and key."""


def _toml(path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise VariantError(f"{path}: not readable TOML: {e}") from None


def _variant_fields(doc: dict) -> tuple[object, object]:
    """(parent, precision) from a manifest: a ``[variant]`` table or top-level keys; (None, None) if absent."""
    table = doc.get("variant") if isinstance(doc.get("variant"), dict) else doc
    return table.get("parent"), table.get("precision")


def _names_parent(parent, folder, spec) -> bool:
    """Whether a variant manifest's ``parent`` (a name, a path, or a table of them) is ``spec``'s model."""
    from pathlib import Path

    from workers.features import repo_root

    entries = parent if isinstance(parent, dict) else {"ref": parent}
    name = entries.get("name")
    path = entries.get("path")
    ref = entries.get("ref")
    if isinstance(ref, str):  # a bare string: a folder if one is there, else a model name
        if "/" in ref or ref.startswith("."):
            path = ref
        else:
            name = ref
    if isinstance(path, str):
        for base in (folder, repo_root(), Path.cwd()):
            cand = (base / path).resolve()
            if cand.is_dir():
                return cand == spec.path.resolve()
    if isinstance(name, str) and name == spec.name:
        version = entries.get("version")
        return version is None or version == spec.version
    return False


def _number(doc: dict, *keys: str):
    """The first of ``keys`` (dotted paths into nested tables) holding a number, or None."""
    for key in keys:
        v = doc
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def read_quality(path) -> dict:
    """The figures the sweep reports from a variant's quality.json.

    Returns {"auc_parent", "auc_variant", "auc_delta", "flip_rate", "max_abs_diff",
    "p99_abs_diff", "source"}; raises VariantError naming the file and the missing key.
    """
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VariantError(f"{path}: not readable JSON: {e}") from None
    if not isinstance(doc, dict):
        raise VariantError(f"{path}: expected a JSON object")
    # AUC of both models on the held-out set: {"auc": {"parent": a, "variant": b}} or flat keys
    auc_parent = _number(doc, "auc.parent", "auc.fp32", "auc.reference", "auc_parent", "parent_auc", "parent.auc")
    auc_variant = _number(doc, "auc.variant", "auc_variant", "variant_auc", "variant.auc")
    if auc_parent is None or auc_variant is None:
        raise VariantError(f"{path}: key 'auc' needs the parent's and the variant's AUC "
                           f"(e.g. \"auc\": {{\"parent\": 0.99, \"variant\": 0.98}}); rerun sluice models quantize")
    q = {"auc_parent": auc_parent, "auc_variant": auc_variant, "auc_delta": auc_parent - auc_variant}
    for key in QUALITY_FIELDS:
        v = _number(doc, key, f"scores.{key}")
        if v is None:
            raise VariantError(f"{path}: key '{key}' missing or not a number; rerun sluice models quantize")
        q[key] = v
    q["source"] = str(path)
    return q


class Variant:
    """One precision of a model: the folder, its spec, its precision label and quality delta."""

    def __init__(self, precision: str, spec, quality: dict, parent: bool = False) -> None:
        self.precision = precision
        self.spec = spec
        self.quality = quality
        self.is_parent = parent

    @property
    def path(self):
        return self.spec.path


def parent_variant(spec) -> Variant:
    """The model itself as the FP32 variant: quality delta 0 by definition."""
    return Variant("fp32", spec, {"auc_parent": None, "auc_variant": None, "auc_delta": 0.0, "flip_rate": 0.0,
                                  "max_abs_diff": 0.0, "p99_abs_diff": 0.0,
                                  "source": "fp32 is the model itself (delta 0 by definition)"}, parent=True)


def read_variant(folder, spec, required: bool = False) -> Variant | None:
    """The variant in ``folder`` if its manifest names ``spec``'s model as parent, else None.

    With ``required`` (a folder named on the command line) a folder that is not a variant of
    this model raises VariantError instead of being passed over.
    """
    from pathlib import Path

    from workers.features import ModelSpec

    folder = Path(folder)
    mf = folder / "manifest.toml"
    if not mf.is_file():
        if required:
            raise VariantError(f"{folder}: no manifest.toml (--variants takes folders made by sluice models quantize)")
        return None
    parent, precision = _variant_fields(_toml(mf))
    if parent is None or not _names_parent(parent, folder, spec):
        if required:
            raise VariantError(f"{mf}: key 'parent' is {parent!r}, not the model {spec.name} {spec.version} "
                               f"({spec.path}); pass variants of --model only")
        return None
    if not isinstance(precision, str) or not precision:
        raise VariantError(f"{mf}: key 'precision' missing (e.g. precision = \"int8\")")
    try:
        vspec = ModelSpec.load(folder)
    except ValueError as e:
        raise VariantError(str(e)) from None
    if vspec.path.resolve() == spec.path.resolve():
        return None
    qpath = folder / "quality.json"
    if not qpath.is_file():
        raise VariantError(f"{qpath}: quality report missing (sluice models quantize writes it beside the manifest)")
    return Variant(precision, vspec, read_quality(qpath))


def find_variants(spec, folders=(), roots=(), problems: list | None = None) -> list[Variant]:
    """The variants of ``spec``: ``folders`` named explicitly (each a variant folder, or a folder of
    them), and every folder under ``roots`` whose manifest names this model as its parent.

    A folder named explicitly that is not a usable variant raises VariantError; one found under
    ``roots`` that cannot be read is appended to ``problems`` (when given) and passed over, so a
    broken folder elsewhere in models/ does not stop the sweep.
    """
    from pathlib import Path

    found: dict[Path, Variant] = {}
    for f in folders:
        f = Path(f)
        if not f.is_dir():
            raise VariantError(f"--variants {f}: not a folder")
        if (f / "manifest.toml").is_file():
            v = read_variant(f, spec, required=True)
            if v is not None:
                found[v.path.resolve()] = v
            continue
        subs = [read_variant(p.parent, spec) for p in sorted(f.glob("*/manifest.toml"))]
        if not any(subs):
            raise VariantError(f"--variants {f}: no variant of {spec.name} in it (no manifest.toml naming "
                               f"it as parent, in the folder or one level below)")
        found.update({v.path.resolve(): v for v in subs if v is not None})
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for mf in sorted(root.glob("*/manifest.toml")):
            try:
                v = read_variant(mf.parent, spec)
            except VariantError as e:
                if problems is None:
                    raise
                problems.append(str(e))
                continue
            if v is not None:
                found.setdefault(v.path.resolve(), v)
    return sorted(found.values(), key=lambda v: (v.precision, str(v.path)))


def _labelled(spec, n: int, seed: int):
    """(feature matrix, labels) of held-out labelled events, or (random rows, None) for other kinds."""
    from workers import telemetry
    from workers.features import Featurizer

    if spec.event_kind not in telemetry.KINDS:
        return np.random.default_rng(seed).standard_normal((n, spec.n_columns)).astype(np.float32), None
    data = telemetry.generate_labelled(spec.event_kind, n, seed=seed)
    fb = Featurizer(spec).featurize(data.values)
    return fb.matrix, data.label[fb.positions]


def _short(reason: str) -> str:
    """The first clause of a backend's reason (the install advice after it is long)."""
    head = reason.split(": pip install")[0].split("\n")[0]
    return head if len(head) <= 110 else head[:107] + "..."


def _why_not(spec, backend: str, device: str) -> str:
    """Why (backend, device) is not usable for this model here, in the backend's own words."""
    from workers.inference import BackendUnavailable, create_backend

    if backend == "torch" and spec.torch_weights_path is None:
        return "the model folder ships no torch weights ([artifacts] torch_weights)"
    try:
        b = create_backend(spec, backend, device)
    except (BackendUnavailable, ValueError, RuntimeError, OSError) as e:
        return str(e)
    close = getattr(b, "close", None)
    if close is not None:
        close()
    return "not usable here (workers.models.usable_backends)"


def _measure(spec, variant: Variant, backend: str, device: str, precision: str, switch: str | None,
             sizes, seconds: float, threads: int, ref: np.ndarray, x: np.ndarray, y, seed: int) -> list[dict]:
    """One engine of one variant: a row per batch size, each with speed, latency and quality."""
    from workers.inference import create_backend
    from workers.offline import bench_inference
    from workers.training import auc

    with _precision_env(switch or "fp32"):
        b = create_backend(variant.spec, backend, device, threads=threads)
    try:
        results = bench_inference(variant.spec, b, list(sizes), seconds=seconds, seed=seed)
        got = b.infer(x)
    finally:
        close = getattr(b, "close", None)
        if close is not None:
            close()
    diff = np.abs(got.astype(np.float64) - ref)
    flips = float(np.mean((got >= spec.threshold) != (ref >= spec.threshold))) if len(x) else 0.0
    measured = {"events": int(len(x)), "flip_rate": flips,
                "max_abs_diff": float(diff.max()) if len(x) else 0.0,
                "p99_abs_diff": float(np.percentile(diff, 99)) if len(x) else 0.0}
    if y is not None:
        measured["auc"] = auc(y, got)
        measured["auc_delta"] = auc(y, ref) - measured["auc"]
    q = variant.quality
    if switch is not None:  # an engine switch on the FP32 model: no report file, so measured here
        q = {"auc_parent": auc(y, ref) if y is not None else None, "auc_variant": measured.get("auc"),
             "auc_delta": measured.get("auc_delta"), "flip_rate": flips, "max_abs_diff": measured["max_abs_diff"],
             "p99_abs_diff": measured["p99_abs_diff"],
             "source": f"measured by the sweep on {len(x)} labelled events vs onnxruntime cpu fp32"}
    rows = []
    for r in results:
        rows.append({
            "model": spec.name, "version": spec.version, "variant": str(variant.path), "backend": backend,
            "device": device, "precision": precision, "batch_size": r["batch_size"], "calls": r["calls"],
            "rows_per_s": r["rows_per_s"], "p50_ms": r["latency_ms_p50"], "p99_ms": r["latency_ms_p99"],
            "us_per_row": r["latency_us_per_row"],
            "auc_parent": q["auc_parent"], "auc_variant": q["auc_variant"], "auc_delta": q["auc_delta"],
            "flip_rate": q["flip_rate"], "max_abs_diff": q["max_abs_diff"], "p99_abs_diff": q["p99_abs_diff"],
            "quality_source": q["source"], "measured": measured,
        })
    return rows


def sweep(spec, variants: Sequence[Variant], batch_sizes: Sequence[int], seconds: float = 1.0, threads: int = 1,
          backends: Sequence[str] | None = None, seed: int = 7) -> dict:
    """Bench every usable backend x precision x batch size of ``spec`` and its ``variants``.

    Returns {"model", "version", "path", "machine", "threads", "seconds", "batch_sizes", "rows",
    "skipped"}: one row per backend, device, precision and batch size (``rows_per_s``, ``p50_ms``,
    ``p99_ms``, the quality delta ``auc_delta`` and ``flip_rate`` with the file they come from, and
    ``measured``: the same engine's flip rate, score differences and AUC on the sweep's own
    labelled events against onnxruntime cpu fp32 of the parent); ``skipped`` lists each engine or
    precision that could not run, with the reason.
    """
    import os
    import platform

    from workers.inference import create_backend
    from workers.models import usable_backends

    x, y = _labelled(spec, SWEEP_QUALITY_ROWS, SWEEP_QUALITY_SEED)
    ref = create_backend(spec, "onnxruntime", "cpu").infer(x).astype(np.float64)
    rows: list[dict] = []
    skipped: list[dict] = []
    engines = [(b, d) for b, d in SWEEP_ENGINES if backends is None or b in backends]
    for v in [parent_variant(spec), *variants]:
        usable = usable_backends(v.spec)
        runs = []  # (backend, device, precision label, engine switch or None)
        for backend, device in engines:
            if device not in usable.get(backend, []):
                skipped.append({"variant": str(v.path), "backend": backend, "device": device,
                                "precision": v.precision, "reason": _why_not(v.spec, backend, device)})
                continue
            runs.append((backend, device, v.precision, None))
            if v.is_parent and device != "cpu":
                for label, switch in ENGINE_SWITCHES.items():
                    if unsupported(backend, device, switch) is None:
                        runs.append((backend, device, label, switch))
        for backend, device, precision, switch in runs:
            try:
                rows += _measure(spec, v, backend, device, precision, switch, batch_sizes, seconds, threads,
                                 ref, x, y, seed)
            except Exception as e:  # noqa: BLE001 - one engine failing must not stop the others
                skipped.append({"variant": str(v.path), "backend": backend, "device": device,
                                "precision": precision, "reason": f"{type(e).__name__}: {e}"})
    return {"model": spec.name, "version": spec.version, "path": str(spec.path),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count()},
            "threads": threads, "seconds": seconds, "batch_sizes": [int(s) for s in batch_sizes],
            "quality_events": int(len(x)), "rows": rows, "skipped": skipped}


def format_sweep(result: dict) -> str:
    """The sweep as a text table: one line per backend, device, precision and batch size."""
    m = result["machine"]
    lines = [f"bench-inference --sweep: {result['model']} {result['version']} on {m['cpus']} CPUs "
             f"({m['processor']}, {m['platform']}), threads={result['threads']}, {result['seconds']:g} s per batch size",
             f"quality delta: AUC delta = parent AUC - variant AUC, flip rate = share of labels that flip at the "
             f"threshold (from the variant's quality.json); 'here': this engine vs onnxruntime cpu fp32 on "
             f"{result['quality_events']} held-out events",
             f"{'backend':<21} {'device':<6} {'prec':<8} {'batch':>6} {'rows/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'AUC delta':>10} {'flip rate':>9} {'flips here':>10} {'max|diff| here':>14}  quality from"]

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in result["rows"]:
        src = r["quality_source"]
        src = "fp32 (delta 0)" if src.startswith("fp32 is") else ("measured here" if src.startswith("measured") else src)
        here = r["measured"]
        lines.append(f"{r['backend']:<21} {r['device']:<6} {r['precision']:<8} {r['batch_size']:>6} "
                     f"{r['rows_per_s']:>12,.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                     f"{num(r['auc_delta'], '>+10.1e')} {num(r['flip_rate'], '>9.5f')} {num(here['flip_rate'], '>10.5f')} "
                     f"{num(here['max_abs_diff'], '>14.2e')}  {src}")
    # one line per engine and reason, whatever the number of precisions it holds back
    skipped: dict[tuple[str, str, str], list[str]] = {}
    for s in result["skipped"]:
        skipped.setdefault((s["backend"], s["device"], _short(s["reason"])), []).append(s["precision"])
    for (backend, device, reason), precisions in skipped.items():
        lines.append(f"skipped: {backend} {device} {','.join(precisions)}: {reason}")
    return "\n".join(lines)


#: marker area (points^2) per millisecond of p99, bounded so a slow row neither vanishes nor covers the plot
PLOT_AREA_PER_MS = 60.0
PLOT_AREA_RANGE = (20.0, 900.0)
#: sideways offset, as a share of the quality axis, between engines drawn at the same quality delta
PLOT_DODGE = 0.05
#: the quality axes a plot can use: row key -> axis label
PLOT_QUALITY = {"auc_delta": "quality delta: parent AUC - variant AUC (lower is better)",
                "flip_rate": "quality delta: share of labels flipped vs FP32 (lower is better)"}


def plot_available() -> str | None:
    """None when matplotlib can be imported, else the one-line fix."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'sluice[plot]'"
    return None


def plot_sweep(result: dict, path, quality: str = "auc_delta") -> None:
    """Write the cost-quality-latency curve as a PNG.

    x: the quality delta (``quality``: AUC drop or label flip rate), y: rows/s (log scale), one
    marker per backend/device/precision/batch size, joined in batch-size order per engine; marker
    area grows with the p99 latency and each marker is labelled "batch: p99", so the fast,
    accurate and responsive choices sit top-left with small markers.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if isinstance(r.get(quality), (int, float))]
    fig, ax = plt.subplots(figsize=(11, 7), dpi=110)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["device"], r["precision"]), []).append(r)
    lo = min((r[quality] for r in rows), default=0.0)
    hi = max((r[quality] for r in rows), default=0.0)
    span = (hi - lo) or 1e-3  # every engine at one x (all fp32): give the axis a width
    # Engines with the same or nearly the same quality delta (every FP32 engine, an FP16 variant
    # next to them) would sit on one vertical line with their labels on top of each other: each
    # is drawn a little to the side (PLOT_DODGE of the axis apart, centred on the cluster) and the
    # caption says so.
    clusters: list[list[tuple]] = []
    for key in sorted(groups, key=lambda k: (groups[k][0][quality], k)):
        if clusters and groups[key][0][quality] - groups[clusters[-1][0]][0][quality] < PLOT_DODGE * span:
            clusters[-1].append(key)
        else:
            clusters.append([key])
    dodge = {key: (i - (len(keys) - 1) / 2) * PLOT_DODGE * span for keys in clusters for i, key in enumerate(keys)}
    markers = "osD^v<>Pp*hX"
    for i, (key, rs) in enumerate(sorted(groups.items())):
        rs.sort(key=lambda r: r["batch_size"])
        xs = [r[quality] + dodge[key] for r in rs]
        ys = [r["rows_per_s"] for r in rs]
        sizes = [min(max(r["p99_ms"] * PLOT_AREA_PER_MS, PLOT_AREA_RANGE[0]), PLOT_AREA_RANGE[1]) for r in rs]
        points = ax.scatter(xs, ys, s=sizes, marker=markers[i % len(markers)], alpha=0.6, edgecolors="black",
                            linewidths=0.5, label=" ".join(key), zorder=3)
        ax.plot(xs, ys, color=points.get_facecolor()[0], alpha=0.4, linewidth=1, zorder=2)  # batch sizes in order
        for r, xv, yv in zip(rs, xs, ys):
            ax.annotate(f"{r['batch_size']}: {r['p99_ms']:.2g} ms", (xv, yv), textcoords="offset points",
                        xytext=(6, -3), fontsize=6.5)
    ax.set_yscale("log")
    ax.set_xlabel(PLOT_QUALITY[quality])
    ax.set_ylabel("throughput, rows/s (log scale)")
    m = result["machine"]
    ax.set_title(f"{result['model']} {result['version']}: throughput vs quality delta; label 'batch: p99', "
                 f"marker area grows with p99\n{m['cpus']} CPUs ({m['processor']}), threads={result['threads']}; "
                 f"engines with (nearly) equal quality delta drawn side by side", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        legend = ax.legend(fontsize=8, loc="best")
        for handle in legend.legend_handles:  # one size in the legend: there, size means nothing
            handle.set_sizes([40.0])
        ax.set_xlim(lo - 0.25 * span, hi + 0.35 * span)
    else:
        ax.text(0.5, 0.5, "no rows ran (see the table's skipped lines)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def run_sweep_cli(args) -> int:
    """``sluice bench-inference --sweep``: variants, the sweep, then the table or ``--json`` and ``--plot``.

    Exit 0 when at least one row ran, 2 for bad arguments or when nothing could run.
    """
    import json
    import sys

    from workers.features import ModelSpec
    from workers.models import models_root

    try:
        spec = ModelSpec.load(args.model)
        sizes = [int(s) for s in _split(args.batch_sizes)]
    except ValueError as e:
        print(f"sluice bench-inference: cannot load the model: {e}", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 1:
        print("sluice bench-inference: --batch-sizes needs positive integers", file=sys.stderr)
        return 2
    if args.plot is not None:
        why = plot_available()
        if why:
            print(f"sluice bench-inference: {why}", file=sys.stderr)
            return 2
        if args.plot.suffix.lower() != ".png":
            print(f"sluice bench-inference: --plot {args.plot}: the plot is a PNG; name the file *.png", file=sys.stderr)
            return 2
    try:
        # variants made beside the model (quantize --out models/NAME-int8) or in the repository's models/
        problems: list[str] = []
        variants = find_variants(spec, args.variants or (), roots=[models_root(), spec.path.parent],
                                 problems=problems)
    except VariantError as e:
        print(f"sluice bench-inference: {e}", file=sys.stderr)
        return 2
    for p in dict.fromkeys(problems):  # the same folder can sit under both roots
        print(f"sluice bench-inference: variant passed over: {p}", file=sys.stderr)
    backends = _split(args.backends) if getattr(args, "backends", None) else None
    result = sweep(spec, variants, sizes, seconds=args.seconds, threads=args.threads, backends=backends)
    if args.plot is not None:
        plot_sweep(result, args.plot, quality=args.plot_quality)
        result["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_sweep(result))
        if args.plot is not None:
            print(f"plot: {args.plot}")
    return 0 if result["rows"] else 2
