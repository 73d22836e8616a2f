"""Backends behind one protocol: parity between torch, onnxruntime and (where present) TensorRT;
missing runtimes and devices fail at start with the install hint, never a silent fallback."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import numpy as np
import pytest

from workers import telemetry
from workers.features import Featurizer, ModelSpec
from workers.inference import Backend, BackendUnavailable, create_backend, known_backends
from workers.models import FP16_MAX_LABEL_FLIP_FRACTION, PARITY_ATOL, PARITY_ATOL_FP16, usable_backends

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ["flow_classifier", "auth_anomaly"]


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


HAS_TORCH = _has("torch")
USABLE = usable_backends()
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed (pip install 'sluice[train]')")


#: SLUICE_REQUIRE_GPU=1 (the README's GPU command): a GPU test whose backend is not usable fails
#: with the backend's own error instead of skipping, so a broken install is never green by accident.
REQUIRE_GPU = os.environ.get("SLUICE_REQUIRE_GPU", "").strip().lower() in ("1", "true", "yes", "on")


def _needs(backend: str, device: str = "cuda"):
    return pytest.mark.skipif(device not in USABLE.get(backend, []) and not REQUIRE_GPU,
                              reason=f"backend {backend!r} on {device} is not usable here (needs an NVIDIA GPU and "
                                     f"pip install 'sluice[gpu]'; TensorRT: 'sluice[tensorrt]' from NVIDIA's index)")


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    spec = ModelSpec.load(ROOT / "models" / request.param)
    values = [v for _, v, _ in telemetry.generate(spec.event_kind, 6000, seed=4711, attack_fraction=0.2)]
    fb = Featurizer(spec).featurize(values)
    assert not fb.rejects
    ref = create_backend(spec, "onnxruntime", "cpu").infer(fb.matrix)
    return spec, fb.matrix, ref


def test_registry_lists_every_backend():
    assert {"onnxruntime", "onnxruntime-tensorrt", "tensorrt", "torch"} <= set(known_backends())


@needs_torch
def test_torch_cpu_matches_onnxruntime_cpu(model):
    spec, x, ref = model
    b = create_backend(spec, "torch", "cpu")
    assert isinstance(b, Backend)
    b.warmup([1, 7, 256])
    got = b.infer(x)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= PARITY_ATOL
    # any batch split gives the same scores
    parts = np.concatenate([b.infer(x[i : i + 333]) for i in range(0, len(x), 333)])
    assert np.max(np.abs(parts - got)) <= 1e-6
    d = b.describe()
    assert d["name"] == "torch" and d["model"] == spec.name and d["weights"].endswith("model.pt")


@needs_torch
def test_torch_backend_refuses_weights_that_do_not_fit(tmp_path, model):
    torch = pytest.importorskip("torch")
    spec = model[0]
    bad = tmp_path / "model.pt"
    torch.save({"nope": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        create_backend(dataclasses.replace(spec, torch_weights_path=bad), "torch", "cpu")


@pytest.mark.parametrize("backend,device", [("tensorrt", "cuda"), ("onnxruntime-tensorrt", "cuda"),
                                            ("onnxruntime", "cuda"), ("torch", "cuda")])
def test_missing_gpu_runtime_fails_at_start_with_the_install_hint(backend, device):
    if device in USABLE.get(backend, []):
        pytest.skip(f"{backend} on {device} is usable here")
    if backend == "torch" and not HAS_TORCH:
        pytest.skip("torch not installed")
    spec = ModelSpec.load(ROOT / "models" / "flow_classifier")
    with pytest.raises(BackendUnavailable, match=r"sluice\[gpu\]"):
        create_backend(spec, backend, device)


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime-tensorrt"])
def test_tensorrt_backends_refuse_cpu(backend):
    spec = ModelSpec.load(ROOT / "models" / "flow_classifier")
    with pytest.raises(BackendUnavailable, match="GPU"):
        create_backend(spec, backend, "cpu")


def test_torch_missing_names_the_train_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    spec = ModelSpec.load(ROOT / "models" / "flow_classifier")
    with pytest.raises(BackendUnavailable, match=r"sluice\[train\]"):
        create_backend(spec, "torch", "cpu")


def test_profile_covers_the_batch_sizes_in_use():
    from workers.inference.gpu_common import profile

    assert profile([1, 2, 4, 256]) == (1, 256, 256)
    assert profile([]) == (1, 4096, 4096)


# ---- GPU: run where a GPU and the gpu extra are present, skip with the reason elsewhere.
# A GPU owner runs them with the README's command (Models and backends, "Running the GPU tests"):
#   rm -rf .venv && PIP_EXTRA_INDEX_URL=https://pypi.nvidia.com SLUICE_EXTRAS=dev,train,tensorrt-cu13 \
#     SLUICE_REQUIRE_GPU=1 ./scripts/test -m gpu -rs -s tests/unit/test_backends.py

#: batch sizes that exercise padding (15, 17), the 16-row multiple, the profile max (1024 after a
#: warm-up of [1, 1024]) and cutting beyond it (1025, 4096)
PARITY_SIZES = (1, 15, 16, 17, 1000, 1025, 4096)
#: (backend, device) of every GPU engine, with what each one needs
GPU_ENGINES = [("onnxruntime", "cuda"), ("onnxruntime-tensorrt", "cuda"), ("tensorrt", "cuda"), ("torch", "cuda")]


def _gpu(backend: str, device: str = "cuda"):
    return pytest.param(backend, device, marks=[pytest.mark.gpu, _needs(backend, device)], id=f"{backend}-{device}")


@pytest.fixture()
def engine_cache(tmp_path, monkeypatch):
    """A fresh engine cache per test; FP32 (no FP16, no TF32) unless the test says otherwise."""
    monkeypatch.setenv("SLUICE_TENSORRT_CACHE_DIR", str(tmp_path / "engines"))
    monkeypatch.delenv("SLUICE_TENSORRT_FP16", raising=False)
    monkeypatch.delenv("SLUICE_GPU_ALLOW_TF32", raising=False)
    return tmp_path / "engines"


@pytest.mark.parametrize("backend,device", [_gpu(b, d) for b, d in GPU_ENGINES])
def test_gpu_parity_with_onnxruntime_cpu_over_batch_sizes(model, engine_cache, backend, device):
    spec, x, ref = model
    b = create_backend(spec, backend, device)
    b.warmup([1, 1024])
    worst = {}
    for n in PARITY_SIZES:
        got = b.infer(x[:n])
        assert got.dtype == np.float32 and got.shape == (n,)
        worst[n] = float(np.max(np.abs(got - ref[:n])))
    assert max(worst.values()) <= PARITY_ATOL, f"max |diff| per batch size: {worst}"
    assert b.describe().get("precision", "fp32") == "fp32"


@pytest.mark.parametrize("backend,device", [_gpu(b, d) for b, d in GPU_ENGINES])
def test_gpu_batch_invariance(model, engine_cache, backend, device):
    """An event's score does not depend on its batch: one batch, uneven splits and single rows agree."""
    spec, x, _ = model
    b = create_backend(spec, backend, device)
    b.warmup([1, 1024])
    x = x[:2100]
    whole = b.infer(x)
    cuts = np.cumsum(np.random.default_rng(11).integers(1, 700, size=20))
    cuts = [0] + [int(c) for c in cuts if c < len(x)] + [len(x)]
    split = np.concatenate([b.infer(x[a:c]) for a, c in zip(cuts, cuts[1:])])
    single = np.array([b.infer(x[i : i + 1])[0] for i in range(0, len(x), 7)], dtype=np.float32)
    assert np.max(np.abs(split - whole)) <= PARITY_ATOL
    assert np.max(np.abs(single - whole[::7])) <= PARITY_ATOL


@pytest.mark.parametrize("backend,device", [_gpu(b, d) for b, d in GPU_ENGINES])
def test_gpu_several_threads(model, engine_cache, backend, device):
    """More threads than TensorRT contexts, uneven chunks: every row gets its own score."""
    from concurrent.futures import ThreadPoolExecutor

    spec, x, ref = model
    b = create_backend(spec, backend, device)
    b.warmup([1, 512])
    bounds = [0, 1, 17, 500, 513, 1600, 2049, 3000, 4500, 4501, 6000]
    chunks = [x[a:c] for a, c in zip(bounds, bounds[1:])]
    with ThreadPoolExecutor(8) as ex:
        for _ in range(3):
            got = np.concatenate(list(ex.map(b.infer, chunks)))
            assert np.max(np.abs(got - ref)) <= PARITY_ATOL


def _retrained(spec, folder: pathlib.Path):
    """The same model (file name, graph, tensor names) with other weights: a retrain in place."""
    onnx = pytest.importorskip("onnx", reason="changing the weights needs onnx (pip install 'sluice[train]')")
    from onnx import numpy_helper

    m = onnx.load(str(spec.onnx_path))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((w * 1.05 + 0.01).astype(w.dtype), init.name))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / spec.onnx_path.name
    onnx.save(m, str(path))
    return dataclasses.replace(spec, onnx_path=path)


@pytest.mark.parametrize("backend", [pytest.param("tensorrt", marks=[pytest.mark.gpu, _needs("tensorrt")]),
                                     pytest.param("onnxruntime-tensorrt", marks=[pytest.mark.gpu, _needs("onnxruntime-tensorrt")])])
def test_gpu_engine_cache_is_reused_and_invalidated_when_the_model_file_changes(model, engine_cache, tmp_path, backend):
    spec, x, ref = model
    live = dataclasses.replace(spec, onnx_path=tmp_path / "live" / spec.onnx_path.name)
    live.onnx_path.parent.mkdir()
    live.onnx_path.write_bytes(spec.onnx_path.read_bytes())

    def engines():  # engine files (native: <key>.engine; ORT's TensorRT EP: TensorrtExecutionProvider_*.engine)
        return {p: p.stat().st_mtime_ns for p in engine_cache.rglob("*.engine") if p.is_file()}

    b = create_backend(live, backend, "cuda")
    b.warmup([1, 1024])
    first = b.infer(x)
    assert np.max(np.abs(first - ref)) <= PARITY_ATOL
    built = engines()
    assert built, "no engine was cached"
    b2 = create_backend(live, backend, "cuda")
    b2.warmup([1, 1024])  # from the cache: nothing rebuilt or rewritten
    assert engines() == built
    assert np.max(np.abs(b2.infer(x) - first)) == 0
    # retrain in place: same path and layout, new weights -> a new engine, the new model's scores
    new = _retrained(spec, tmp_path / "retrained")
    live.onnx_path.write_bytes(new.onnx_path.read_bytes())
    new_ref = create_backend(new, "onnxruntime", "cpu").infer(x)
    assert np.max(np.abs(new_ref - ref)) > 1e-3, "the retrained model should score differently"
    b3 = create_backend(live, backend, "cuda")
    b3.warmup([1, 1024])
    assert np.max(np.abs(b3.infer(x) - new_ref)) <= PARITY_ATOL, "scored with the old engine"
    assert set(engines()) > set(built)


@pytest.mark.parametrize("backend", [pytest.param("tensorrt", marks=[pytest.mark.gpu, _needs("tensorrt")]),
                                     pytest.param("onnxruntime-tensorrt", marks=[pytest.mark.gpu, _needs("onnxruntime-tensorrt")])])
def test_gpu_fp16_label_flips_and_largest_score_difference(model, engine_cache, monkeypatch, record_property, backend):
    """FP16 kernels: how many labels flip at the threshold and how far scores move, both bounded."""
    monkeypatch.setenv("SLUICE_TENSORRT_FP16", "1")
    spec, x, ref = model
    b = create_backend(spec, backend, "cuda")
    b.warmup([1, 1024])
    assert b.describe()["fp16"] is True
    got = b.infer(x)
    flips = int(np.sum((got >= spec.threshold) != (ref >= spec.threshold)))
    diff = float(np.max(np.abs(got - ref)))
    record_property("fp16_label_flips", flips)
    record_property("fp16_max_abs_diff", diff)
    print(f"{spec.name} {backend} fp16: {flips} of {len(x)} labels flip at {spec.threshold}, max |diff| {diff:.2e}")
    assert diff <= PARITY_ATOL_FP16
    assert flips <= FP16_MAX_LABEL_FLIP_FRACTION * len(x)


@pytest.mark.gpu
@_needs("tensorrt")
def test_native_tensorrt_profile_and_engine_file(model, engine_cache):
    import stat

    spec, x, ref = model
    b = create_backend(spec, "tensorrt", "cuda")
    b.warmup([1, 64, 1024])  # PaddedRows rounds these to 16, 64, 1024; the profile still starts at 1
    d = b.describe()
    assert d["profile"] == [1, 1024, 1024] and d["precision"] == "fp32" and d["contexts"] >= 2
    engines = list(engine_cache.glob("*.engine"))
    assert len(engines) == 1 and spec.name in engines[0].name and "trt10" in engines[0].name
    assert stat.S_IMODE(engines[0].stat().st_mode) == 0o644
    assert np.max(np.abs(b.infer(x) - ref)) <= PARITY_ATOL


@pytest.mark.gpu
@_needs("onnxruntime-tensorrt")
def test_onnxruntime_tensorrt_ep_is_in_use_with_a_per_model_cache(model, engine_cache):
    spec, x, ref = model
    b = create_backend(spec, "onnxruntime-tensorrt", "cuda")
    b.warmup([1, 64, 1024])
    d = b.describe()
    assert d["providers"][0] == "TensorrtExecutionProvider" and d["profile"] == [1, 1024, 1024]
    folder = pathlib.Path(d["engine_cache"])
    assert folder.parent == engine_cache / "onnxruntime" and spec.name in folder.name and any(folder.iterdir())
    assert np.max(np.abs(b.infer(x) - ref)) <= PARITY_ATOL
