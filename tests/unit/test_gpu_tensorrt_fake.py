"""The native TensorRT backend end to end on a stand-in TensorRT and CUDA runtime (no GPU needed).

The stand-ins keep the contracts the backend relies on: cuda-python's ``(err, value)`` returns
and host/device copies (here both in host memory, copied with memmove), and TensorRT 10's
engine/context calls, including the rule that contexts running at the same time must use
different optimization profiles (the fake context raises if two overlap on one profile) and that
``set_input_shape`` rejects shapes outside the profile. The "engine" computes a fixed function of
each row (sigmoid of a weighted row sum, weights from the model bytes), so copies, offsets and
chunking errors show up as wrong scores. What the real engine computes is the GPU tests' job.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import pathlib
import stat
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from workers.features import ModelSpec
from workers.inference import create_backend

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _weights(onnx: bytes, f: int) -> np.ndarray:
    return np.frombuffer(onnx[:f].ljust(f, b"\1"), dtype=np.uint8).astype(np.float32) / 255.0 - 0.5


def _expected(onnx: bytes, x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-(x @ _weights(onnx, x.shape[1]))))).astype(np.float32)


class FakeCudart:
    """cuda-python's runtime module: every call returns (err, *values); memory is host memory."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's spelling
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        self._buffers: dict[int, ctypes.Array] = {}

    def _alloc(self, n):
        buf = ctypes.create_string_buffer(int(n))
        self._buffers[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    cudaMallocHost = cudaMalloc = _alloc

    def cudaFree(self, p):
        self._buffers.pop(int(p), None)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaSetDevice(self, i):
        return (0,)

    def cudaGetDeviceProperties(self, i):
        return 0, types.SimpleNamespace(name=b"Fake H200\0", major=9, minor=0)

    def cudaStreamCreate(self):
        return 0, 7000 + len(self._buffers)

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(int(dst), int(src), int(n))
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"


class FakeTrt:
    """The parts of TensorRT 10's Python API the backend uses."""

    __version__ = "10.13.3.9"

    class BuilderFlag:
        FP16, TF32 = "FP16", "TF32"

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class MemoryPoolType:
        WORKSPACE = "ws"

    def __init__(self, spec):
        self.spec = spec
        self.builds = 0
        self.running: dict[int, int] = {}  # profile -> contexts executing on it now
        self.overlaps = 0
        self.lock = threading.Lock()
        trt = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                if not blob.startswith(b"FAKE"):
                    return None
                return Engine(json.loads(blob[4:]))

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                assert name == trt.spec.input_name
                self.shape = (lo[0], opt[0], hi[0])

        class Config:
            def __init__(self):
                self.flags = {"TF32"}
                self.profiles = []

            def set_memory_pool_limit(self, pool, n):
                pass

            def set_flag(self, f):
                self.flags.add(f)

            def clear_flag(self, f):
                self.flags.discard(f)

            def add_optimization_profile(self, p):
                self.profiles.append(p.shape)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return types.SimpleNamespace()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                trt.builds += 1
                time.sleep(0.05)  # a build takes time: concurrent builders would overlap
                return b"FAKE" + json.dumps({"profiles": config.profiles, "flags": sorted(config.flags),
                                             "onnx": list(trt.onnx[: trt.spec.n_columns])}).encode()

        class OnnxParser:
            def __init__(self, network, logger):
                pass

            def parse(self, blob):
                trt.onnx = blob
                return True

        class Context:
            def __init__(self, engine):
                self.engine, self.profile, self.addr, self.rows = engine, None, {}, None

            def set_optimization_profile_async(self, i, stream):
                if not 0 <= i < len(self.engine.doc["profiles"]):
                    return False
                self.profile = i
                return True

            def set_tensor_address(self, name, addr):
                if name not in (trt.spec.input_name, trt.spec.output_name):
                    return False
                self.addr[name] = addr
                return True

            def set_input_shape(self, name, shape):
                lo, _, hi = self.engine.doc["profiles"][self.profile]
                if not lo <= shape[0] <= hi:
                    return False
                self.rows = shape[0]
                return True

            def execute_async_v3(self, stream):
                with trt.lock:
                    trt.running[self.profile] = trt.running.get(self.profile, 0) + 1
                    if trt.running[self.profile] > 1:
                        trt.overlaps += 1
                time.sleep(0.001)
                f = trt.spec.n_columns
                x = np.ctypeslib.as_array((ctypes.c_float * (self.rows * f)).from_address(self.addr[trt.spec.input_name]))
                y = np.ctypeslib.as_array((ctypes.c_float * self.rows).from_address(self.addr[trt.spec.output_name]))
                y[:] = _expected(bytes(self.engine.doc["onnx"]), x.reshape(self.rows, f).copy())
                with trt.lock:
                    trt.running[self.profile] -= 1
                return True

        class Engine:
            def __init__(self, doc):
                self.doc = doc
                self.num_io_tensors = 2
                self.num_optimization_profiles = len(doc["profiles"])

            def get_tensor_name(self, i):
                return [trt.spec.input_name, trt.spec.output_name][i]

            def get_tensor_mode(self, name):
                return "in" if name == trt.spec.input_name else "out"

            def create_execution_context(self):
                return Context(self)

        self.Logger, self.Runtime, self.Builder, self.OnnxParser = Logger, Runtime, Builder, OnnxParser


@pytest.fixture()
def fake_trt(monkeypatch, tmp_path):
    from workers.inference import tensorrt_backend

    spec = ModelSpec.load(ROOT / "models" / "flow_classifier")
    model = tmp_path / "model" / spec.onnx_path.name
    model.parent.mkdir()
    model.write_bytes(spec.onnx_path.read_bytes())
    spec = dataclasses.replace(spec, onnx_path=model)
    trt = FakeTrt(spec)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_backend, "_import_cudart", lambda: FakeCudart())
    monkeypatch.setenv("SLUICE_TENSORRT_CACHE_DIR", str(tmp_path / "engines"))
    for k in ("SLUICE_TENSORRT_FP16", "SLUICE_GPU_ALLOW_TF32"):
        monkeypatch.delenv(k, raising=False)
    return spec, trt, tmp_path / "engines"


def test_scores_every_row_through_padding_chunking_and_profiles(fake_trt):
    spec, trt, cache = fake_trt
    b = create_backend(spec, "tensorrt", "cuda")
    b.warmup([1, 64, 1024])
    d = b.describe()
    assert d["profile"] == [1, 1024, 1024] and d["precision"] == "fp32" and d["contexts"] == 4
    x = np.random.default_rng(5).normal(size=(4200, spec.n_columns)).astype(np.float32)
    onnx = spec.onnx_path.read_bytes()
    for n in (1, 15, 16, 17, 1000, 1025, 4096, 4200):
        np.testing.assert_allclose(b.infer(x[:n]), _expected(onnx, x[:n]), rtol=1e-6, atol=1e-7)
    doc = json.loads(next(cache.glob("*.engine")).read_bytes()[4:])
    assert doc["flags"] == [] and doc["profiles"] == [[1, 1024, 1024]] * 4  # TF32 cleared, one profile per context


def test_threads_never_share_a_profile_and_get_their_own_rows(fake_trt):
    spec, trt, _ = fake_trt
    b = create_backend(spec, "tensorrt", "cuda")
    b.warmup([1, 512])
    x = np.random.default_rng(6).normal(size=(6000, spec.n_columns)).astype(np.float32)
    bounds = [0, 1, 17, 500, 513, 1600, 2049, 3000, 4500, 4501, 6000]
    with ThreadPoolExecutor(8) as ex:  # more threads than contexts
        for _ in range(3):
            got = np.concatenate(list(ex.map(b.infer, [x[a:c] for a, c in zip(bounds, bounds[1:])])))
            np.testing.assert_allclose(got, _expected(spec.onnx_path.read_bytes(), x), rtol=1e-6, atol=1e-7)
    assert trt.overlaps == 0


def test_engine_cache_reused_then_rebuilt_when_the_model_file_changes(fake_trt):
    spec, trt, cache = fake_trt
    create_backend(spec, "tensorrt", "cuda").warmup([1, 1024])
    (engine,) = cache.glob("*.engine")
    assert trt.builds == 1 and stat.S_IMODE(engine.stat().st_mode) == 0o644
    create_backend(spec, "tensorrt", "cuda").warmup([1, 1024])
    assert trt.builds == 1  # loaded from the cache
    spec.onnx_path.write_bytes(b"\x7f" + spec.onnx_path.read_bytes()[1:])  # retrained in place
    b = create_backend(spec, "tensorrt", "cuda")
    b.warmup([1, 1024])
    assert trt.builds == 2 and len(list(cache.glob("*.engine"))) == 2
    x = np.random.default_rng(7).normal(size=(50, spec.n_columns)).astype(np.float32)
    np.testing.assert_allclose(b.infer(x), _expected(spec.onnx_path.read_bytes(), x), rtol=1e-6, atol=1e-7)


def test_scoring_processes_sharing_a_cache_build_once(fake_trt):
    spec, trt, cache = fake_trt
    backends = [create_backend(spec, "tensorrt", "cuda") for _ in range(4)]  # like 4 scoring processes
    threads = [threading.Thread(target=b.warmup, args=([1, 256],)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trt.builds == 1 and len(list(cache.glob("*.engine"))) == 1


def test_a_larger_warmup_replaces_the_engine_while_other_threads_score(fake_trt):
    spec, trt, _ = fake_trt
    b = create_backend(spec, "tensorrt", "cuda")
    b.warmup([1, 64])
    x = np.random.default_rng(8).normal(size=(300, spec.n_columns)).astype(np.float32)
    want = _expected(spec.onnx_path.read_bytes(), x)
    stop = threading.Event()
    errors = []

    def score():
        while not stop.is_set():
            try:
                np.testing.assert_allclose(b.infer(x), want, rtol=1e-6, atol=1e-7)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    ts = [threading.Thread(target=score) for _ in range(3)]
    for t in ts:
        t.start()
    b.warmup([1, 2048])
    time.sleep(0.1)
    stop.set()
    for t in ts:
        t.join()
    assert errors == [] and b.describe()["profile"] == [1, 2048, 2048]
