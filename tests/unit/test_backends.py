"""Backends behind one protocol: parity between torch, onnxruntime and (where present) TensorRT;
missing runtimes and devices fail at start with the install hint, never a silent fallback."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import numpy as np
import pytest

from workers import telemetry
from workers.features import Featurizer, ModelSpec
from workers.inference import Backend, BackendUnavailable, create_backend, known_backends
from workers.models import PARITY_ATOL, PARITY_ATOL_FP16, usable_backends

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


def _needs(backend: str, device: str = "cuda"):
    return pytest.mark.skipif(device not in USABLE.get(backend, []),
                              reason=f"backend {backend!r} on {device} is not usable here (needs a GPU and pip install 'sluice[gpu]')")


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


# ---- GPU: run where a GPU and the gpu extra are present, skip with the reason elsewhere


@pytest.mark.gpu
@_needs("torch", "cuda")
def test_torch_cuda_matches_onnxruntime_cpu(model):
    spec, x, ref = model
    b = create_backend(spec, "torch", "cuda")
    b.warmup([1, 256, 1024])
    assert np.max(np.abs(b.infer(x) - ref)) <= PARITY_ATOL


@pytest.mark.gpu
@_needs("onnxruntime", "cuda")
def test_onnxruntime_cuda_matches_cpu(model):
    spec, x, ref = model
    assert np.max(np.abs(create_backend(spec, "onnxruntime", "cuda").infer(x) - ref)) <= PARITY_ATOL


@pytest.mark.gpu
@_needs("tensorrt")
def test_native_tensorrt_matches_onnxruntime_and_caches_its_engine(model, tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_TENSORRT_CACHE_DIR", str(tmp_path))
    spec, x, ref = model
    b = create_backend(spec, "tensorrt", "cuda")
    b.warmup([1, 64, 1024])
    assert b.describe()["profile"] == [1, 1024, 1024]
    got = b.infer(x)  # 6000 rows > profile max: split
    assert np.max(np.abs(got - ref)) <= PARITY_ATOL
    engines = list(tmp_path.glob("*.engine"))
    assert len(engines) == 1 and spec.name in engines[0].name and "trt" in engines[0].name
    mtime = engines[0].stat().st_mtime_ns
    b2 = create_backend(spec, "tensorrt", "cuda")
    b2.warmup([1, 64, 1024])  # from the cache, not rebuilt
    assert engines[0].stat().st_mtime_ns == mtime
    assert np.max(np.abs(b2.infer(x) - got)) == 0


@pytest.mark.gpu
@_needs("tensorrt")
def test_native_tensorrt_threads_have_their_own_streams(model, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("SLUICE_TENSORRT_CACHE_DIR", str(tmp_path))
    spec, x, ref = model
    b = create_backend(spec, "tensorrt", "cuda")
    b.warmup([1, 512])
    chunks = [x[i : i + 500] for i in range(0, len(x), 500)]
    with ThreadPoolExecutor(4) as ex:
        got = np.concatenate(list(ex.map(b.infer, chunks)))
    assert np.max(np.abs(got - ref)) <= PARITY_ATOL


@pytest.mark.gpu
@_needs("tensorrt")
def test_native_tensorrt_fp16_within_its_tolerance(model, tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_TENSORRT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SLUICE_TENSORRT_FP16", "1")
    spec, x, ref = model
    b = create_backend(spec, "tensorrt", "cuda")
    b.warmup([1, 1024])
    assert b.describe()["fp16"] is True
    assert np.max(np.abs(b.infer(x) - ref)) <= PARITY_ATOL_FP16


@pytest.mark.gpu
@_needs("onnxruntime-tensorrt")
def test_onnxruntime_tensorrt_ep_matches_and_uses_its_engine_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_TENSORRT_CACHE_DIR", str(tmp_path))
    spec, x, ref = model
    b = create_backend(spec, "onnxruntime-tensorrt", "cuda")
    b.warmup([1, 64, 1024])
    assert b.describe()["providers"][0] == "TensorrtExecutionProvider"
    assert np.max(np.abs(b.infer(x) - ref)) <= PARITY_ATOL
    assert any((tmp_path / "onnxruntime").iterdir())
