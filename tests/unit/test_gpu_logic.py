"""The GPU backends' logic that runs without a GPU: the usability gate, the onnxruntime-gpu checks,
CUDA library preloading, TF32 off by default, engine-cache keys, build locks, file modes, the
TensorRT version check, profiles and chunking, and the execution-context pool.

Runtimes that are not installed here (onnxruntime-gpu's providers, TensorRT) are stood in for by
small fakes that record what the backends ask of them; the numbers themselves are checked by the
GPU tests in test_backends.py.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import stat
import sys
import threading
import time
import types

import numpy as np
import onnxruntime as ort
import pytest

from workers.features import ModelSpec
from workers.inference import BackendUnavailable, create_backend, gpu_common
from workers.inference.base import PaddedRows

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture()
def spec():
    return ModelSpec.load(ROOT / "models" / "flow_classifier")


@pytest.fixture()
def fake_gpu(monkeypatch):
    """onnxruntime-gpu with CUDA and TensorRT providers on a host whose driver sees one GPU.

    Sessions really run on the CPU provider (so the graph checks and scores are real) but report
    the providers they were asked for; every creation is recorded with its options.
    """
    calls: list = []
    real_session = ort.InferenceSession

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=None):
            calls.append(("session", providers))
            self._inner = real_session(path, sess_options=sess_options, providers=[CPU_EP])
            self._providers = [p[0] if isinstance(p, tuple) else p for p in providers]

        def get_providers(self):
            return self._providers

        def __getattr__(self, name):
            return getattr(self._inner, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT_EP, CUDA_EP, CPU_EP])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(ort, "preload_dlls", lambda **kw: calls.append(("preload", kw)), raising=False)
    monkeypatch.setattr(gpu_common, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(gpu_common, "onnxruntime_distributions", lambda: {"onnxruntime-gpu": "1.31.1"})
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.3.9"))
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    monkeypatch.delenv("SLUICE_GPU_ALLOW_TF32", raising=False)
    monkeypatch.delenv("SLUICE_TENSORRT_FP16", raising=False)
    # os.environ changes made by the backend are undone by monkeypatch.delenv's teardown
    return calls


# ---- item 7: profiles and chunking


def test_profile_min_is_one_row_whatever_the_warmup_sizes():
    # PaddedRows rounds warm-up sizes to multiples of 16; the profile must still accept 1 row
    rounded = sorted({-(-n // 16) * 16 for n in (1, 64, 1024)})
    assert rounded == [16, 64, 1024]
    assert gpu_common.profile(rounded) == (1, 1024, 1024)
    assert gpu_common.profile([1000, 4096]) == (1, 4096, 4096)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 1024, 1025, 1040, 4096, 4097, 6000, 6016])
@pytest.mark.parametrize("prof", [(1, 1024, 1024), (16, 512, 512), (1, 1000, 1000), (64, 4096, 4096)])
def test_chunks_cover_the_batch_within_the_profile(n, prof):
    lo, _, hi = prof
    pieces = gpu_common.chunks(n, prof)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a2 == b1 for (_, b1), (a2, _) in zip(pieces, pieces[1:]))
    if n > hi:  # a batch that needs cutting never leaves a piece below the profile's minimum
        assert all(lo <= b - a <= hi for a, b in pieces), pieces
    if n % 16 == 0 and hi % 16 == 0:  # PaddedRows' 16-row blocks stay whole
        assert all((b - a) % 16 == 0 for a, b in pieces), pieces


def test_chunks_never_leave_a_runt_last_piece():
    # range(0, 1030, 1024) would leave 6 rows, below a profile minimum of 16
    assert gpu_common.chunks(1030, (16, 1024, 1024)) == [(0, 515), (515, 1030)]
    assert gpu_common.chunks(0, (1, 16, 16)) == []


# ---- item 3: the test gate asks whether a GPU backend can run, not whether it is compiled in


def test_compiled_in_provider_without_a_gpu_is_not_usable(monkeypatch):
    from workers.models import usable_backends

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT_EP, CUDA_EP, CPU_EP])
    monkeypatch.setattr(gpu_common, "onnxruntime_distributions", lambda: {"onnxruntime-gpu": "1.31.1"})
    monkeypatch.setattr(gpu_common, "cuda_device_count", lambda: 0)
    u = usable_backends()
    assert u["onnxruntime"] == ["cpu"] and "onnxruntime-tensorrt" not in u and "tensorrt" not in u
    monkeypatch.setattr(gpu_common, "cuda_device_count", lambda: 1)
    assert usable_backends()["onnxruntime"] == ["cpu", "cuda"]
    # both wheels installed: the providers cannot be trusted
    monkeypatch.setattr(gpu_common, "onnxruntime_distributions",
                        lambda: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    assert usable_backends()["onnxruntime"] == ["cpu"]


def test_cuda_device_count_is_zero_without_a_driver():
    # this machine has no NVIDIA driver; on a GPU machine the count is checked by the GPU tests
    if any(pathlib.Path(d).exists() for d in ("/dev/nvidia0", "/dev/nvidiactl")):
        pytest.skip("an NVIDIA device node exists here")
    assert gpu_common.cuda_device_count() == 0


# ---- item 2: both onnxruntime wheels installed


def test_both_onnxruntime_wheels_fail_the_gpu_start_with_the_fix(fake_gpu, monkeypatch, spec):
    monkeypatch.setattr(gpu_common, "onnxruntime_distributions",
                        lambda: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    with pytest.raises(BackendUnavailable, match=r"pip uninstall -y onnxruntime onnxruntime-gpu.*sluice\[gpu\]"):
        create_backend(spec, "onnxruntime", "cuda")
    assert not [c for c in fake_gpu if c[0] == "session"]


def test_install_hints_name_the_extra_per_cuda_major_and_tensorrts_index():
    # onnxruntime-gpu 1.27+ is built for CUDA 13; the hint used to say CUDA 12
    assert "sluice[gpu-cu13]" in gpu_common.GPU_HINT and "CUDA 13" in gpu_common.GPU_HINT
    assert "sluice[gpu-cu12]" in gpu_common.GPU_HINT and "CUDA 12" in gpu_common.GPU_HINT
    assert "https://pypi.nvidia.com" in gpu_common.TENSORRT_HINT and "--find-links" in gpu_common.TENSORRT_HINT


def test_no_gpu_seen_by_the_driver_fails_the_start(fake_gpu, monkeypatch, spec):
    monkeypatch.setattr(gpu_common, "cuda_device_count", lambda: 0)
    with pytest.raises(BackendUnavailable, match="sees 0 GPU"):
        create_backend(spec, "onnxruntime", "cuda")


# ---- items 4 and 6: preload the CUDA libraries; FP32 means FP32


def test_cuda_backend_preloads_the_cuda_libraries_and_turns_tf32_off(fake_gpu, spec):
    b = create_backend(spec, "onnxruntime", "cuda")
    kinds = [c[0] for c in fake_gpu]
    assert kinds == ["preload", "session"]  # libraries loaded before the session exists
    assert fake_gpu[0][1] == {"cuda": True, "cudnn": True, "msvc": False}
    providers = fake_gpu[1][1]
    assert providers[0] == (CUDA_EP, {"device_id": "0", "use_tf32": "0"})
    assert os.environ.get("NVIDIA_TF32_OVERRIDE") == "0"
    assert b.describe()["precision"] == "fp32"
    x = np.random.default_rng(0).normal(size=(40, spec.n_columns)).astype(np.float32)
    assert b.infer(x).shape == (40,)


def test_tf32_is_an_explicit_setting(fake_gpu, monkeypatch, spec):
    monkeypatch.setenv("SLUICE_GPU_ALLOW_TF32", "1")
    b = create_backend(spec, "onnxruntime", "cuda:0")
    assert fake_gpu[-1][1][0] == (CUDA_EP, {"device_id": "0", "use_tf32": "1"})
    assert "NVIDIA_TF32_OVERRIDE" not in os.environ
    assert b.describe()["precision"] == "fp32-tf32"


def test_preload_reason_reaches_the_error_when_the_provider_does_not_start(fake_gpu, monkeypatch, spec):
    def broken(**kw):
        raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(ort, "preload_dlls", broken)
    real = ort.InferenceSession

    class CpuOnly(real):  # the CUDA provider failed to load: ORT fell back to the CPU
        def get_providers(self):
            return [CPU_EP]

    monkeypatch.setattr(ort, "InferenceSession", CpuOnly)
    with pytest.raises(BackendUnavailable, match=r"could not initialise CUDAExecutionProvider.*libcudnn"):
        create_backend(spec, "onnxruntime", "cuda")


# ---- item 5 (+6, +8): the TensorRT EP's engine cache, per model bytes, precision; one build at a time


def _trt_ep_backend(spec, onnx_path):
    from workers.inference.onnxruntime_tensorrt_backend import OnnxRuntimeTensorRTBackend

    b = OnnxRuntimeTensorRTBackend(dataclasses.replace(spec, onnx_path=onnx_path), device="cuda")
    b.load()
    return b


def test_trt_ep_engine_cache_changes_with_the_weights_and_holds_the_timing_cache(fake_gpu, spec, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("SLUICE_TENSORRT_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model.onnx"
    shutil.copy(spec.onnx_path, model)
    prof = (1, 1024, 1024)
    first = _trt_ep_backend(spec, model).trt_options(prof)
    model.write_bytes(model.read_bytes() + b"\0")  # "retrained": same name, same graph names, new bytes
    second = _trt_ep_backend(spec, model).trt_options(prof)
    assert first["trt_engine_cache_path"] != second["trt_engine_cache_path"]
    assert first["trt_timing_cache_path"] == first["trt_engine_cache_path"]
    assert pathlib.Path(first["trt_engine_cache_path"]).parent == tmp_path / "cache" / "onnxruntime"
    assert first["trt_fp16_enable"] == "False" and first["trt_profile_min_shapes"].endswith(f":1x{spec.n_columns}")
    monkeypatch.setenv("SLUICE_GPU_ALLOW_TF32", "1")
    tf32 = _trt_ep_backend(spec, model).trt_options(prof)
    monkeypatch.setenv("SLUICE_TENSORRT_FP16", "1")
    fp16 = _trt_ep_backend(spec, model).trt_options(prof)
    paths = {second["trt_engine_cache_path"], tf32["trt_engine_cache_path"], fp16["trt_engine_cache_path"]}
    assert len(paths) == 3 and fp16["trt_fp16_enable"] == "True"


def test_trt_ep_session_is_built_once_under_concurrent_first_batches(fake_gpu, spec, tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_TENSORRT_CACHE_DIR", str(tmp_path))
    b = _trt_ep_backend(spec, spec.onnx_path)
    real_open = b._open

    def slow_open(*a, **k):
        time.sleep(0.2)  # an engine build takes seconds; two threads would both start one
        return real_open(*a, **k)

    b._open = slow_open
    x = np.zeros((8, spec.n_columns), np.float32)
    threads = [threading.Thread(target=b.infer, args=(x,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sessions = [c for c in fake_gpu if c[0] == "session"]
    assert len(sessions) == 1
    trt_opts = dict(sessions[0][1])[TRT_EP]
    assert trt_opts["trt_engine_cache_path"] == str(b.cache)
    assert dict(sessions[0][1])[CUDA_EP]["use_tf32"] == "0" and os.environ.get("NVIDIA_TF32_OVERRIDE") == "0"
    assert (b.cache.parent / (b.cache.name + ".lock")).exists()  # built under the cross-process lock
    assert b.describe()["profile"] == [1, 4096, 4096]


def test_trt_ep_cuts_large_batches_into_profile_sized_pieces(fake_gpu, spec, tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_TENSORRT_CACHE_DIR", str(tmp_path))
    b = PaddedRows(_trt_ep_backend(spec, spec.onnx_path))
    b.warmup([1, 64, 512])
    seen = []
    inner = b.inner
    real_run = inner._run
    inner._run = lambda out, feeds: (seen.append(len(next(iter(feeds.values())))), real_run(out, feeds))[1]
    x = np.random.default_rng(3).normal(size=(1100, spec.n_columns)).astype(np.float32)
    ref = create_backend(spec, "onnxruntime", "cpu").infer(x)
    got = b.infer(x)
    assert seen and all(1 <= s <= 512 and s % 16 == 0 for s in seen) and sum(seen) == 1104
    assert np.max(np.abs(got - ref)) <= 1e-6


# ---- item 8: native TensorRT pieces


def test_tensorrt_version_check_accepts_10_only():
    from workers.inference.tensorrt_backend import check_tensorrt_version

    check_tensorrt_version("10.13.3.9")
    for bad in ("11.0.0.114", "8.6.1", "nightly"):
        with pytest.raises(BackendUnavailable, match="TensorRT"):
            check_tensorrt_version(bad)


def test_tensorrt_11_is_refused_at_load(monkeypatch, spec):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.4.0.106"))
    with pytest.raises(BackendUnavailable, match=r"TensorRT 11.4.0.106 is installed.*TensorRT 10"):
        create_backend(spec, "tensorrt", "cuda")


class _Flags:
    def __init__(self):
        self.on = {"TF32"}  # TensorRT's default: TF32 allowed

    def set_flag(self, f):
        self.on.add(f)

    def clear_flag(self, f):
        self.on.discard(f)


_FAKE_TRT = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(FP16="FP16", TF32="TF32"),
                                  TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"))


@pytest.mark.parametrize("fp16,tf32,expected", [(False, False, set()), (False, True, {"TF32"}),
                                                (True, False, {"FP16"}), (True, True, {"FP16", "TF32"})])
def test_builder_precision_flags(fp16, tf32, expected):
    from workers.inference.tensorrt_backend import configure_precision

    cfg = _Flags()
    configure_precision(_FAKE_TRT, cfg, fp16, tf32)
    assert cfg.on == expected


def test_engine_io_names_are_checked_against_the_manifest(spec):
    from workers.inference.tensorrt_backend import check_engine_io

    class Engine:
        def __init__(self, io):
            self.io = io
            self.num_io_tensors = len(io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return dict(self.io)[name]

    check_engine_io(Engine([(spec.input_name, "in"), (spec.output_name, "out")]), _FAKE_TRT, spec)
    with pytest.raises(ValueError, match="manifest"):
        check_engine_io(Engine([(spec.input_name, "in"), ("logits", "out")]), _FAKE_TRT, spec)
    with pytest.raises(ValueError, match="manifest"):
        check_engine_io(Engine([(spec.input_name, "in"), (spec.output_name, "out"), ("extra", "out")]), _FAKE_TRT, spec)


def test_a_refused_tensor_address_raises():
    from workers.inference.tensorrt_backend import bind

    class Ctx:
        def set_tensor_address(self, name, addr):
            return name == "features"

    bind(Ctx(), "features", 1024)
    with pytest.raises(RuntimeError, match="'score'"):
        bind(Ctx(), "score", 2048)


def test_native_engine_key_changes_with_weights_precision_and_contexts(spec, monkeypatch):
    from workers.inference.tensorrt_backend import TensorRTBackend

    def key(onnx=b"weights-1", **env):
        for k in ("SLUICE_TENSORRT_FP16", "SLUICE_GPU_ALLOW_TF32"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        b = TensorRTBackend(spec)
        b._onnx, b._gpu, b._cc, b._trt = onnx, "NVIDIA H200", "90", types.SimpleNamespace(__version__="10.13.3.9")
        return b.cache_key((1, 1024, 1024))

    base = key()
    assert base.endswith("-fp32.engine") and "-nvidia-h200-sm90-trt10.13.3.9-b1_1024_1024x4-" in base
    assert key(b"weights-2") != base
    assert key(SLUICE_GPU_ALLOW_TF32="1").endswith("-fp32-tf32.engine")
    assert key(SLUICE_TENSORRT_FP16="1").endswith("-fp16.engine")


def test_engine_files_are_readable_by_other_users(tmp_path):
    old = os.umask(0o077)  # a service user's strict umask; mkstemp alone gives 0600
    try:
        path = tmp_path / "m.engine"
        gpu_common.write_atomically(path, b"engine")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"engine"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.engine"]  # no temp file left behind


def test_file_lock_lets_one_builder_in_at_a_time(tmp_path):
    lock = tmp_path / "m.engine.lock"
    inside, peak, order = [0], [0], []
    guard = threading.Lock()

    def build(i):
        with gpu_common.file_lock(lock):  # separate open file descriptions: flock excludes them
            with guard:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            order.append(i)
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1 and sorted(order) == [0, 1, 2, 3]


def test_file_lock_excludes_another_process(tmp_path):
    import subprocess

    lock = tmp_path / "m.engine.lock"
    code = ("import sys, time; from workers.inference.gpu_common import file_lock; import pathlib\n"
            "with file_lock(pathlib.Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(0.6)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "locked"
    t0 = time.monotonic()
    with gpu_common.file_lock(lock):
        waited = time.monotonic() - t0
    p.wait(timeout=10)
    assert waited >= 0.3


def test_context_pool_never_shares_a_profile_between_concurrent_calls():
    from workers.inference.tensorrt_backend import ContextPool, PoolRetired

    made, closed = [], []

    class Slot:
        def __init__(self, index):
            self.index = index
            made.append(index)

        def close(self):
            closed.append(self.index)

    pool = ContextPool(Slot, 3)
    busy: set = set()
    guard = threading.Lock()
    clashes, peak = [], [0]

    def work():
        for _ in range(200):
            s = pool.acquire()
            with guard:
                if s.index in busy:
                    clashes.append(s.index)
                busy.add(s.index)
                peak[0] = max(peak[0], len(busy))
            time.sleep(0.0005)
            with guard:
                busy.discard(s.index)
            pool.release(s)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clashes == [] and sorted(made) == [0, 1, 2] and peak[0] <= 3
    held = pool.acquire()
    pool.retire()
    assert sorted(closed) == sorted(i for i in made if i != held.index)  # idle ones closed now
    pool.release(held)
    assert sorted(closed) == [0, 1, 2]  # the busy one when it came back
    with pytest.raises(PoolRetired):
        pool.acquire()
