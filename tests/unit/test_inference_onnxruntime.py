"""The backend registry and the onnxruntime backend."""

from __future__ import annotations

import dataclasses
import pathlib
import threading

import numpy as np
import pytest

from workers.features import ModelSpec
from workers.inference import Backend, BackendUnavailable, create_backend, known_backends
from workers.models import usable_backends

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec():
    return ModelSpec.load(ROOT / "models" / "flow_classifier")


@pytest.fixture(scope="module")
def backend(spec):
    return create_backend(spec)


def test_registry_lists_onnxruntime_and_rejects_unknown(spec):
    assert "onnxruntime" in known_backends()
    with pytest.raises(ValueError, match="onnxruntime"):
        create_backend(spec, backend="tensorflow")
    with pytest.raises(ValueError, match="device"):
        create_backend(spec, device="tpu")
    with pytest.raises(ValueError, match="threads"):
        create_backend(spec, threads=0)


def test_describe_and_protocol(backend, spec):
    assert isinstance(backend, Backend)
    d = backend.describe()
    assert d["name"] == "onnxruntime" and d["device"] == "cpu"
    assert d["providers"] == ["CPUExecutionProvider"]
    assert (d["model"], d["model_version"]) == (spec.name, spec.version)
    assert (d["input_name"], d["output_name"]) == (spec.input_name, spec.output_name)


@pytest.mark.parametrize("n", [0, 1, 7, 64, 513])
def test_infer_shapes_and_range(backend, spec, n):
    x = np.random.default_rng(n).normal(size=(n, spec.n_columns)).astype(np.float32)
    y = backend.infer(x)
    assert y.dtype == np.float32 and y.shape == (n,)
    assert ((y >= 0) & (y <= 1)).all()


def test_infer_matches_single_rows_and_accepts_float64_views(backend, spec):
    x = np.random.default_rng(1).normal(size=(32, spec.n_columns))
    batch = backend.infer(x.astype(np.float32))
    rows = np.array([backend.infer(x[i : i + 1].astype(np.float32))[0] for i in range(32)])
    assert np.allclose(batch, rows, atol=1e-6)
    assert np.allclose(backend.infer(x[::1]), batch, atol=1e-6)  # float64 input converted
    with pytest.raises(ValueError, match="float32"):
        backend.infer(np.zeros((2, spec.n_columns + 1), np.float32))


def test_warmup_runs_each_size_once(backend, spec, monkeypatch):
    """Warm-up runs the session once per distinct positive batch size as it will be run (rows
    padded to the backend's row multiple), smallest first, with the model's input width."""
    session = getattr(backend, "inner", backend)  # create_backend pads rows (PaddedRows)
    multiple = getattr(backend, "multiple", 1)
    shapes: list[tuple[int, ...]] = []
    run = session._run

    def recording_run(outputs, feeds):
        (x,) = feeds.values()
        shapes.append(x.shape)
        return run(outputs, feeds)

    monkeypatch.setattr(session, "_run", recording_run)
    backend.warmup([512, 1, 64, 64, 0])
    padded = sorted({-(-n // multiple) * multiple for n in (1, 64, 512)})
    assert shapes == [(n, spec.n_columns) for n in padded]
    assert len(shapes) >= 2  # a row multiple of 512 or more would make this test meaningless


def test_concurrent_infer_is_thread_safe(backend, spec):
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(100, spec.n_columns)).astype(np.float32) for _ in range(8)]
    want = [backend.infer(x) for x in xs]
    got: dict[int, np.ndarray] = {}

    def work(i):
        for _ in range(20):
            got[i] = backend.infer(xs[i])
            assert np.array_equal(got[i], want[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[i], want[i]) for i in range(8))


@pytest.mark.skipif("cuda" in usable_backends().get("onnxruntime", []), reason="onnxruntime runs on a GPU here")
def test_cuda_without_provider_or_gpu_is_unavailable_with_install_hint(spec):
    # on the CPU wheel: no CUDA provider; with onnxruntime-gpu on a host without a GPU: no device
    with pytest.raises(BackendUnavailable, match=r"sluice\[gpu\]"):
        create_backend(spec, device="cuda")


def test_missing_onnxruntime_names_the_cpu_extra(spec, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ort(name, *a, **k):  # `pip install .` alone: onnxruntime lives in the cpu / gpu-* extras
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(BackendUnavailable, match=r"sluice\[cpu\]"):
        create_backend(spec)


def test_missing_or_mismatched_model_is_a_clear_error(spec, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        create_backend(dataclasses.replace(spec, onnx_path=tmp_path / "nope.onnx"))
    with pytest.raises(ValueError, match="no input named"):
        create_backend(dataclasses.replace(spec, input_name="wrong"))
    with pytest.raises(ValueError, match="no output named"):
        create_backend(dataclasses.replace(spec, output_name="wrong"))
