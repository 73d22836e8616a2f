"""Model folders: discovery, the torch definition loader, and consistency checks.

A model is a folder ``models/<name>/`` with ``manifest.toml`` (the contract:
features, output, artifacts), ``model.onnx`` (served), ``baseline.json``
(training distributions for drift), ``train.py`` and, for the torch backend and
the ONNX-vs-torch parity check, ``model.py`` (the ``nn.Module``, imported by
both ``train.py`` and the torch backend) with its trained ``state_dict``
``model.pt``. A quantized variant (``sluice models quantize``, workers/variants.py)
ships only the ONNX graph and baseline, plus a ``[variant]`` table naming its
parent; it is checked against that parent instead of against torch.

Nothing here imports torch unless a torch path is taken.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

from workers.features import ModelSpec, repo_root

__all__ = ["load_definition", "discover", "models_root"]


def models_root() -> pathlib.Path:
    return repo_root() / "models"


def discover(root: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """Model folders (those holding a manifest.toml) under ``root`` (default: the repository's models/)."""
    r = pathlib.Path(root) if root is not None else models_root()
    return sorted(p.parent for p in r.glob("*/manifest.toml"))


def load_definition(spec: ModelSpec) -> ModuleType:
    """Import ``[artifacts] torch_module`` (model.py) of a model; needs torch.

    Each model's module gets its own name (``sluice_models.<name>``), so two
    models' ``model.py`` never shadow each other in one process.
    """
    if spec.torch_module_path is None:
        raise ValueError(f"{spec.manifest_path}: no [artifacts] torch_module (model.py) for the torch definition")
    if not spec.torch_module_path.is_file():
        raise ValueError(f"{spec.torch_module_path}: torch definition not found ([artifacts] torch_module in {spec.manifest_path})")
    modname = f"sluice_models.{spec.name}"
    mod = sys.modules.get(modname)
    if mod is not None and getattr(mod, "__file__", None) == str(spec.torch_module_path):
        return mod
    ms = importlib.util.spec_from_file_location(modname, spec.torch_module_path)
    mod = importlib.util.module_from_spec(ms)
    sys.modules[modname] = mod
    try:
        ms.loader.exec_module(mod)  # type: ignore[union-attr]
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    if not callable(getattr(mod, "build", None)):
        raise ValueError(f"{spec.torch_module_path}: must define build(n_columns) -> torch.nn.Module")
    return mod


# ----------------------------------------------------------------------------- listing

#: torch vs onnxruntime (FP32) on the same feature rows: max absolute score difference allowed.
#: Measured: flow_classifier 1.8e-7, auth_anomaly 2.1e-6 (the log/exp calibration amplifies float32 rounding).
PARITY_ATOL = 1e-5
#: TensorRT with FP16 kernels (SLUICE_TENSORRT_FP16=1) vs FP32 onnxruntime.
PARITY_ATOL_FP16 = 2e-2
#: FP16: the share of events whose label may flip at the threshold. Only events scored within
#: PARITY_ATOL_FP16 of the threshold can flip; 0.5% is a bound set before any GPU measurement
#: (the GPU test prints the measured count, to tighten it from).
FP16_MAX_LABEL_FLIP_FRACTION = 0.005


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _tensorrt_ok() -> bool:
    """TensorRT installed, and the major version the backends are written for."""
    if not _has_module("tensorrt"):
        return False
    try:
        from importlib import metadata

        from workers.inference.gpu_common import TENSORRT_MAJOR

        versions = [metadata.version(d) for d in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12")
                    if _dist_installed(d)]
        # no distribution metadata (a tar install): load() reads tensorrt.__version__ and decides
        return all(int(v.split(".")[0]) == TENSORRT_MAJOR for v in versions)
    except (ValueError, ImportError):
        return False


def _dist_installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def usable_backends(spec: ModelSpec | None = None) -> dict[str, list[str]]:
    """backend -> devices usable on this machine (runtime installed, GPU present, artifacts shipped).

    Probes without building anything; torch is imported only when installed. A GPU backend is
    usable only when its runtime can actually run here: a provider compiled into onnxruntime-gpu
    is not enough (the CPU onnxruntime may sit on top of it, or the host may have no GPU), so the
    CUDA driver must see a GPU too. The GPU tests gate on this, so they skip (with the reason)
    where the backend cannot run instead of failing.
    """
    from workers.inference import gpu_common

    out: dict[str, list[str]] = {}
    gpus = gpu_common.cuda_device_count()
    try:
        import onnxruntime as ort

        prov = ort.get_available_providers()
        ort_gpu = gpus > 0 and gpu_common.onnxruntime_conflict() is None
        out["onnxruntime"] = ["cpu"] + (["cuda"] if ort_gpu and "CUDAExecutionProvider" in prov else [])
        if ort_gpu and "TensorrtExecutionProvider" in prov and "CUDAExecutionProvider" in prov and _tensorrt_ok():
            out["onnxruntime-tensorrt"] = ["cuda"]
    except ImportError:  # `pip install .` without the cpu or a gpu extra
        pass
    if gpus > 0 and _tensorrt_ok() and (_has_module("cuda.bindings") or _has_module("cuda")):
        try:
            from workers.inference.tensorrt_backend import _Cuda, _import_cudart

            if int(_Cuda(_import_cudart())("cudaGetDeviceCount")) > 0:
                out["tensorrt"] = ["cuda"]
        except Exception:  # noqa: BLE001 - no driver / no GPU: not usable
            pass
    if (spec is None or spec.torch_weights_path is not None) and _has_module("torch"):
        try:
            import torch

            out["torch"] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        except Exception:  # noqa: BLE001 - a broken torch install is not usable
            pass
    return out


def describe_model(path: pathlib.Path) -> dict:
    """One model folder as ``sluice models list`` shows it: contract, backends usable here, variant."""
    from workers.variants import read_variant

    spec = ModelSpec.load(path)
    variant = read_variant(spec.manifest_path)
    bk = usable_backends(spec)
    try:
        rel = str(spec.path.relative_to(repo_root()))
    except ValueError:
        rel = str(spec.path)
    return {
        "name": spec.name,
        "version": spec.version,
        "path": rel,
        "event_kind": spec.event_kind,
        "description": spec.description,
        "score": spec.score_name,
        "threshold": spec.threshold,
        "features": len(spec.features),
        "columns": spec.n_columns,
        "event_schema": str(spec.schema_path.relative_to(repo_root())) if spec.schema_path and spec.schema_path.is_relative_to(repo_root()) else (str(spec.schema_path) if spec.schema_path else None),
        "backends": sorted(bk),
        "devices": bk,
        "variant": None if variant is None else {
            "precision": variant.precision, "method": variant.method, "parent": variant.parent_path,
            "parent_version": variant.parent_version},
    }


# ----------------------------------------------------------------------------- check


class CheckReport:
    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, name: str, ok: bool | None, detail: str = "") -> bool:
        """ok None = skipped (with the reason in detail)."""
        self.items.append({"check": name, "status": "skip" if ok is None else "ok" if ok else "FAIL", "detail": detail})
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(i["status"] != "FAIL" for i in self.items)


def _sample_events(spec: ModelSpec, n: int, seed: int, bad_fraction: float = 0.0):
    from workers import telemetry

    if spec.event_kind not in telemetry.KINDS:
        return None
    return list(telemetry.generate(spec.event_kind, n, seed=seed, bad_fraction=bad_fraction, start_ts=1.79e9,
                                   attack_fraction=0.1))


def _fatal(mismatched: list[str]) -> bool:
    """A name or column mismatch means other artifacts; a version alone is a re-versioned copy."""
    return any(k != "version" for k in mismatched)


def _mismatch(mismatched: list[str], theirs: object, ours: str) -> str:
    if _fatal(mismatched):
        return f"differs from the manifest: {mismatched} (retrain)"
    return (f"version {theirs!r} here, {ours!r} in the manifest: a re-versioned copy of the same artifacts "
            "(name and columns match)")


def check_model(path: str | pathlib.Path, events: int = 4000, seed: int = 12345) -> CheckReport:
    """Artifacts vs manifest, schema vs features, generated events, ONNX vs torch parity.

    A quantized variant is checked against its parent instead of torch (workers/variants.py):
    parent identity and sha256, its quality report, and its manifest's tolerance on fresh events.
    """
    import json

    import numpy as np

    from workers.features import Baseline, Featurizer
    from workers.inference import BackendUnavailable, create_backend
    from workers.variants import VariantError, check_variant, read_variant

    rep = CheckReport()
    try:
        spec = ModelSpec.load(path)
    except ValueError as e:
        rep.add("manifest", False, str(e))
        return rep
    rep.add("manifest", True, f"{spec.name} {spec.version}: {len(spec.features)} features, {spec.n_columns} columns")
    try:
        variant = read_variant(spec.manifest_path)
    except VariantError as e:
        variant = None
        rep.add("variant manifest", False, str(e))

    # -- artifacts exist
    arts = [("model", spec.onnx_path), ("baseline", spec.baseline_path)]
    if spec.torch_module_path is not None:
        arts += [("torch_module", spec.torch_module_path), ("torch_weights", spec.torch_weights_path)]
    missing = [f"{k}={p.name}" for k, p in arts if p is None or not p.is_file()]
    rep.add("artifacts present", not missing, "missing: " + ", ".join(missing) if missing else ", ".join(p.name for _, p in arts))

    # -- ONNX graph vs manifest
    ort_backend = None
    try:
        ort_backend = create_backend(spec, "onnxruntime", "cpu")
        rep.add("onnx input/output", True, f"{spec.input_name} [n, {spec.n_columns}] -> {spec.output_name} [n]")
    except (ValueError, BackendUnavailable) as e:
        rep.add("onnx input/output", False, str(e))
    if spec.onnx_path.is_file() and _has_module("onnx"):
        import onnx

        try:
            meta = {p.key: p.value for p in onnx.load(str(spec.onnx_path), load_external_data=False).metadata_props}
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: a corrupt file is a failed check
            rep.add("onnx metadata", False, f"{spec.onnx_path.name} does not parse as ONNX: {type(e).__name__}: {e}")
            meta = None
        want = {"model": spec.name, "version": spec.version, "columns": ",".join(spec.columns)}
        bad = [k for k, v in want.items() if meta is not None and k in meta and meta[k] != v]
        if meta is not None:
            rep.add("onnx metadata", not _fatal(bad) and bool(meta),
                    _mismatch(bad, meta.get("version"), spec.version) if bad
                    else ("model, version, columns match" if meta else "no sluice metadata in the ONNX (retrain with train.py)"))

    # -- baseline vs manifest
    if spec.baseline_path.is_file():
        try:
            Baseline.load(spec)
            doc = json.loads(spec.baseline_path.read_text())
            bad = [k for k, v in (("model", spec.name), ("version", spec.version), ("columns", list(spec.columns)))
                   if doc.get(k) != v]
            rep.add("baseline", not _fatal(bad), _mismatch(bad, doc.get("version"), spec.version) if bad
                    else f"{len(doc['features'])} feature distributions + score")
        except (ValueError, KeyError) as e:
            rep.add("baseline", False, str(e))

    # -- schema vs features
    rep.add("schema vs features", *_schema_agrees(spec))

    # -- generated events: schema-valid, featurize without rejects, defects get their reasons
    fz = None
    try:
        fz = Featurizer(spec)
    except ValueError as e:
        rep.add("featurizer", False, str(e))
    recs = _sample_events(spec, events, seed)
    matrix = None
    if recs is None:
        rep.add("generated events", None, f"no telemetry generator for event_kind {spec.event_kind!r}")
    elif fz is not None:
        values = [v for _, v, _ in recs]
        fb = fz.featurize(values)
        rep.add("generated events featurize", not fb.rejects,
                f"{len(fb)} of {len(values)} scored" + (f"; first reject: {fb.rejects[0]}" if fb.rejects else ""))
        matrix = fb.matrix
        schema = spec.event_schema()
        if schema is not None and _has_module("jsonschema"):
            import jsonschema
            import orjson

            v = jsonschema.Draft202012Validator(schema)
            errs = [e.message for val in values[:1000] for e in v.iter_errors(orjson.loads(val))]
            rep.add("generated events match the schema", not errs, errs[0] if errs else f"{min(1000, len(values))} events valid")
        from workers import telemetry

        bad_recs = [(v, dict(h)[telemetry.DEFECT_HEADER].decode()) for _, v, h in _sample_events(spec, 3000, seed + 1, 0.3)
                    if telemetry.DEFECT_HEADER in dict(h)]
        fbb = fz.featurize([v for v, _ in bad_recs])
        got = {r.position: r.reason for r in fbb.rejects}
        wrong = [(exp, got.get(i, "scored")) for i, (_, exp) in enumerate(bad_recs) if got.get(i) != exp]
        rep.add("defects get their reasons", not wrong,
                f"{len(bad_recs)} malformed records" + (f"; e.g. expected {wrong[0][0]}, got {wrong[0][1]}" if wrong else ""))

    # -- scores and parity
    if matrix is not None and ort_backend is not None and len(matrix):
        s = ort_backend.infer(matrix)
        rep.add("scores in [0, 1]", bool(np.all(np.isfinite(s)) and s.min() >= 0 and s.max() <= 1),
                f"min {s.min():.3g} max {s.max():.3g}, {float((s >= spec.threshold).mean()):.1%} above threshold")
        if variant is not None:
            rep.add("onnx vs torch", None, f"the {variant.precision} variant ships no torch definition; "
                                            f"it is checked against its parent below")
        elif spec.torch_weights_path is None:
            rep.add("onnx vs torch", None, "the manifest ships no torch definition")
        elif not _has_module("torch"):
            rep.add("onnx vs torch", None, "torch is not installed (pip install 'sluice[train]')")
        else:
            try:
                t = create_backend(spec, "torch", "cpu").infer(matrix)
                diff = float(np.max(np.abs(t - s)))
                rep.add("onnx vs torch", diff <= PARITY_ATOL, f"max |diff| {diff:.2e} on {len(s)} events (tolerance {PARITY_ATOL:g})")
            except (ValueError, BackendUnavailable, RuntimeError) as e:
                rep.add("onnx vs torch", False, str(e))
    if variant is not None:
        check_variant(spec, variant, rep, events, seed)
    return rep


def _schema_agrees(spec: ModelSpec) -> tuple[bool | None, str]:
    schema = spec.event_schema()
    if schema is None:
        return None, "the manifest names no event_schema"
    props = schema.get("properties", {}) or {}
    required = set(schema.get("required", []) or [])
    jtypes = {"number": {"number", "integer"}, "integer": {"integer"}, "string": {"string"}, "boolean": {"boolean"},
              "flags": {"string", "integer"}}
    problems = []
    for f in spec.features:
        p = props.get(f.source)
        if p is None:
            problems.append(f"feature {f.name!r}: source field {f.source!r} is not in the schema")
            continue
        t = p.get("type")
        types = {t} if isinstance(t, str) else set(t or [])
        if not (types - {"null"}) & jtypes[f.type]:
            problems.append(f"feature {f.name!r}: type {f.type!r} vs schema {sorted(types)}")
        if f.default is None and f.source not in required:
            problems.append(f"feature {f.name!r} has no default but {f.source!r} is optional in the schema "
                            f"(schema-valid events would be dead-lettered)")
        lo, hi = p.get("minimum"), p.get("maximum")
        if f.valid_range is not None:
            if (lo is not None and f.valid_range[1] < lo) or (hi is not None and f.valid_range[0] > hi):
                problems.append(f"feature {f.name!r}: valid_range {list(f.valid_range)} outside the schema's [{lo}, {hi}]")
        last = f.transform[-1] if f.transform else None
        if last is not None and last.op == "onehot":
            vocab = list(last.get("vocab"))
            enum = p.get("enum")
            if enum is not None and any(v not in enum for v in vocab):
                problems.append(f"feature {f.name!r}: vocab items {[v for v in vocab if v not in enum]} not in the schema enum")
            if f.type in ("number", "integer"):
                out = [v for v in vocab if (lo is not None and v < lo) or (hi is not None and v > hi)]
                if out:
                    problems.append(f"feature {f.name!r}: vocab items {out} outside the schema's [{lo}, {hi}]")
            ml = p.get("maxLength")
            if f.type == "string" and ml is not None and any(len(v) > ml for v in vocab):
                problems.append(f"feature {f.name!r}: vocab items longer than the schema's maxLength {ml}")
            if f.default is not None and f.type == "string" and f.default not in vocab and last.get("unknown", "other") == "zeros":
                problems.append(f"feature {f.name!r}: default {f.default!r} is not in the vocab (it would be all zeros)")
    if not problems:
        try:
            from workers.features import _build_decoder

            _build_decoder(spec)
        except ValueError as e:
            problems.append(str(e))
    return (not problems), ("; ".join(problems) if problems else
                            f"{len(spec.features)} features read {len(set(f.source for f in spec.features))} schema fields consistently")
