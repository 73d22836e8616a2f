"""Native TensorRT backend (``backend = "tensorrt"``, device ``cuda[:N]``).

- The engine is built from the model's ONNX with :data:`MAX_CONTEXTS` identical optimization
  profiles whose (min, opt, max) batch rows are (1, largest, largest) of the batch sizes in use
  (``warmup`` gets them from the worker). Larger batches are cut by ``gpu_common.chunks``, so
  no piece is larger than the max or smaller than the min.
- Concurrency: TensorRT requires execution contexts that run at the same time to use different
  optimization profiles. Contexts live in a :class:`ContextPool` of at most ``MAX_CONTEXTS``, each
  bound to its own profile, CUDA stream, pinned host buffers and device buffers (sized to the
  profile's max); a call takes one, runs H2D copy, ``execute_async_v3``, D2H copy and one stream
  synchronize, and gives it back. More threads than contexts wait for one.
- Engines are cached on disk (``SLUICE_TENSORRT_CACHE_DIR``), keyed by model name + version + a
  hash of the ONNX bytes, GPU name and compute capability, TensorRT version, profile, number of
  profiles and precision (FP16, TF32); a restart deserializes instead of rebuilding. A file lock
  beside the engine lets one process build while the others wait and load its file; files are
  written atomically (temp file + rename) with mode 0644, so replicas sharing a cache under other
  users never read a torn engine and can read the whole one.
- Precision: FP32 by default, with TensorRT's TF32 builder flag (on by default in TensorRT)
  cleared, so scores stay within 1e-5 of onnxruntime/torch; ``SLUICE_GPU_ALLOW_TF32=1`` keeps
  TF32, ``SLUICE_TENSORRT_FP16=1`` adds FP16 kernels.
- The engine's input and output names are checked against the manifest, and every
  ``set_tensor_address`` / ``set_input_shape`` result is checked: a mismatch fails loudly rather
  than scoring garbage.

TensorRT (``pip install 'sluice[tensorrt]'`` with NVIDIA's index) and cuda-python
(``sluice[gpu]``) are imported lazily; the CPU machine never needs them. API: TensorRT 10 Python
(``trt.Builder``, ``create_optimization_profile``, ``build_serialized_network``,
``IExecutionContext.set_optimization_profile_async / set_input_shape / set_tensor_address /
execute_async_v3``) and cuda-python's runtime bindings.
"""

from __future__ import annotations

import ctypes
import threading
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from workers.inference import gpu_common
from workers.inference.base import BackendUnavailable
from workers.inference.gpu_common import (
    DEFAULT_BATCH_SIZES, GPU_HINT, TENSORRT_HINT, TENSORRT_MAJOR, cache_dir, fp16_enabled, profile,
)

if TYPE_CHECKING:  # pragma: no cover
    from workers.features import ModelSpec

#: Execution contexts that may run at once, one optimization profile each. Four covers the
#: worker's inference threads per scoring process (1-4); each costs a stream and two buffers of
#: the profile's max rows, and every profile adds build time once.
MAX_CONTEXTS = 4

#: TensorRT's scratch memory limit for the builder: far more than an MLP needs, small on any GPU.
WORKSPACE_BYTES = 1 << 30


def check_tensorrt_version(version: str) -> None:
    """BackendUnavailable unless ``version`` is TensorRT 10.x, the API this module is written for."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise BackendUnavailable(f"cannot read TensorRT's version {version!r}: {TENSORRT_HINT}") from None
    if major != TENSORRT_MAJOR:
        raise BackendUnavailable(
            f"TensorRT {version} is installed; these backends need TensorRT {TENSORRT_MAJOR}.x "
            f"(pip install 'tensorrt-cu13>={TENSORRT_MAJOR},<{TENSORRT_MAJOR + 1}'): {TENSORRT_HINT}")


def configure_precision(trt, config, fp16: bool, tf32: bool) -> None:
    """Set the builder's precision flags: FP16 only when asked; TF32 (on by default) cleared unless allowed."""
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)


def check_engine_io(engine, trt, spec: "ModelSpec") -> None:
    """ValueError unless the engine has exactly the manifest's input and output tensors."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
    if inputs != [spec.input_name] or outputs != [spec.output_name]:
        raise ValueError(
            f"TensorRT engine for {spec.onnx_path} has inputs {inputs} and outputs {outputs}; the manifest "
            f"({spec.manifest_path}) names input {spec.input_name!r} and output {spec.output_name!r}")


def bind(context, name: str, address: int) -> None:
    """``set_tensor_address`` that fails loudly (it returns False for an unknown name or bad alignment)."""
    if not context.set_tensor_address(name, address):
        raise RuntimeError(f"TensorRT refused the address of tensor {name!r} (unknown name or misaligned buffer)")


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as e:
            raise BackendUnavailable(f"backend 'tensorrt' needs cuda-python ({e}): {GPU_HINT}") from e
    return cudart


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(
            f"backend 'tensorrt' needs TensorRT {TENSORRT_MAJOR}, which is not installed ({e}): {TENSORRT_HINT}") from e
    check_tensorrt_version(trt.__version__)
    return trt


class _Cuda:
    """Thin checked wrapper over cuda-python's runtime calls (they return (err, *values))."""

    def __init__(self, cudart):
        self.rt = cudart

    def __call__(self, fn: str, *args):
        out = getattr(self.rt, fn)(*args)
        err, rest = out[0], out[1:]
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            raise RuntimeError(f"{fn} failed: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else (rest or None)


class PoolRetired(RuntimeError):
    """The pool's engine was replaced by a larger one; take the backend's current pool."""


class ContextPool:
    """At most ``size`` slots (execution contexts), each made once for its own profile index.

    ``acquire`` hands an idle slot, or makes one for a free profile index, or waits; no two
    holders ever share a profile index. ``retire`` (a rebuilt engine) closes idle slots now and
    busy ones when they come back.
    """

    def __init__(self, make: Callable[[int], object], size: int):
        if size < 1:
            raise ValueError("a context pool needs at least one slot")
        self._make = make
        self._cond = threading.Condition()
        self._idle: list = []
        self._free = list(range(size))
        self._retired = False

    def acquire(self):
        """An idle slot, a new one, or (all busy) wait for one."""
        with self._cond:
            while True:
                if self._retired:
                    raise PoolRetired("context pool retired (the engine was replaced)")
                if self._idle:
                    return self._idle.pop()
                if self._free:
                    index = self._free.pop(0)
                    break
                self._cond.wait()
        try:
            return self._make(index)
        except BaseException:
            with self._cond:
                self._free.append(index)
                self._cond.notify()
            raise

    def release(self, slot) -> None:
        """Give a slot back (closed instead when the pool is retired)."""
        with self._cond:
            if not self._retired:
                self._idle.append(slot)
                self._cond.notify()
                return
        slot.close()

    def retire(self) -> None:
        """Close idle slots; busy ones are closed when released."""
        with self._cond:
            self._retired = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for s in idle:
            s.close()


class _Slot:
    """One execution context on its own optimization profile, with its stream and buffers."""

    def __init__(self, backend: "TensorRTBackend", engine, index: int, rows: int):
        cu = backend._cu
        cu("cudaSetDevice", backend._dev_id)
        self.cu = cu
        self.index = index
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (GPU memory?)")
        self.stream = cu("cudaStreamCreate")
        if not self.context.set_optimization_profile_async(index, int(self.stream)):
            raise RuntimeError(f"TensorRT refused optimization profile {index} for a new execution context")
        f = backend.spec.n_columns
        self.in_bytes = rows * f * 4
        self.out_bytes = rows * 4
        self.h_in = cu("cudaMallocHost", self.in_bytes)
        self.h_out = cu("cudaMallocHost", self.out_bytes)
        self.d_in = cu("cudaMalloc", self.in_bytes)
        self.d_out = cu("cudaMalloc", self.out_bytes)
        self.in_view = np.ctypeslib.as_array((ctypes.c_float * (rows * f)).from_address(int(self.h_in))).reshape(rows, f)
        self.out_view = np.ctypeslib.as_array((ctypes.c_float * rows).from_address(int(self.h_out)))
        bind(self.context, backend.spec.input_name, int(self.d_in))
        bind(self.context, backend.spec.output_name, int(self.d_out))
        cu("cudaStreamSynchronize", self.stream)

    def close(self) -> None:
        cu = self.cu
        for fn, p in (("cudaFree", self.d_in), ("cudaFree", self.d_out),
                      ("cudaFreeHost", self.h_in), ("cudaFreeHost", self.h_out)):
            try:
                cu(fn, p)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        try:
            cu("cudaStreamDestroy", self.stream)
        except Exception:  # noqa: BLE001
            pass
        self.context = None


class TensorRTBackend:
    """A TensorRT engine built from the model's ONNX; see the module docstring."""

    name = "tensorrt"

    def __init__(self, spec: "ModelSpec", device: str = "cuda", threads: int = 1):
        self.spec = spec
        self.device = device
        self.threads = threads
        self.fp16 = fp16_enabled()
        self.tf32 = gpu_common.tf32_allowed()
        self.contexts = MAX_CONTEXTS
        self.cache = cache_dir()
        self._engine = None
        self._profile: tuple[int, int, int] | None = None
        self._engine_path = None
        self._lock = threading.Lock()
        self._pool: ContextPool | None = None
        # (pool, profile) swapped as one tuple, so a call never pairs a pool with another engine's profile
        self._current: tuple[ContextPool, tuple[int, int, int]] | None = None

    # -- load: check everything the build will need, build nothing yet ----------------------

    def load(self) -> None:
        """Check TensorRT 10, cuda-python, the driver and the GPU, and read the model."""
        if self.device == "cpu":
            raise BackendUnavailable("backend 'tensorrt' runs on an NVIDIA GPU: set [model] device = \"cuda\" "
                                     "(or use backend 'onnxruntime' / 'torch' on cpu)")
        trt = _import_tensorrt()
        cu = _Cuda(_import_cudart())
        try:
            count = cu("cudaGetDeviceCount")
        except RuntimeError as e:
            raise BackendUnavailable(f"no usable CUDA driver/GPU for backend 'tensorrt' ({e}): {GPU_HINT}") from e
        self._dev_id = int(self.device.split(":", 1)[1]) if ":" in self.device else 0
        if self._dev_id >= int(count):
            raise BackendUnavailable(f"device {self.device!r}: {int(count)} CUDA device(s) present")
        cu("cudaSetDevice", self._dev_id)
        props = cu("cudaGetDeviceProperties", self._dev_id)
        name = props.name
        self._gpu = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).strip("\x00 ")
        self._cc = f"{props.major}{props.minor}"
        if not self.spec.onnx_path.is_file():
            raise ValueError(f"model file {self.spec.onnx_path} not found (artifacts.model in {self.spec.manifest_path})")
        self._onnx = self.spec.onnx_path.read_bytes()
        self._trt = trt
        self._cu = cu
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)

    # -- engine ---------------------------------------------------------------------------

    def cache_key(self, prof: tuple[int, int, int]) -> str:
        """The engine's file name: everything that makes two engines differ."""
        lo, opt, hi = prof
        return (f"{self.spec.name}-{gpu_common.slug(self.spec.version)}-{gpu_common.model_digest(self._onnx)}"
                f"-{gpu_common.slug(self._gpu)}-sm{self._cc}-trt{gpu_common.slug(self._trt.__version__)}"
                f"-b{lo}_{opt}_{hi}x{self.contexts}-{gpu_common.precision_tag(self.fp16, self.tf32)}.engine")

    def _build(self, prof: tuple[int, int, int]) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(self._onnx):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"TensorRT cannot parse {self.spec.onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        configure_precision(trt, config, self.fp16, self.tf32)
        f = self.spec.n_columns
        lo, opt, hi = prof
        for _ in range(self.contexts):  # one profile per concurrent context
            p = builder.create_optimization_profile()
            p.set_shape(self.spec.input_name, (lo, f), (opt, f), (hi, f))
            config.add_optimization_profile(p)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine for {self.spec.onnx_path} (see the TensorRT log)")
        return bytes(serialized)

    def _load_or_build(self, path, prof: tuple[int, int, int]):
        """The engine at ``path`` if it deserializes, else a new build written there; under the file lock."""
        with gpu_common.file_lock(path.with_name(path.name + ".lock")):
            blob = path.read_bytes() if path.is_file() else None
            engine = self._runtime.deserialize_cuda_engine(blob) if blob else None
            if engine is None:  # not cached, or stale/corrupt: rebuild and replace
                blob = self._build(prof)
                gpu_common.write_atomically(path, blob)
                engine = self._runtime.deserialize_cuda_engine(blob)
                if engine is None:
                    raise RuntimeError("TensorRT could not deserialize the engine it just built")
        return engine

    def _ensure(self, batch_sizes: Sequence[int]) -> None:
        prof = profile(batch_sizes)
        with self._lock:
            if self._engine is not None and self._profile is not None and prof[2] <= self._profile[2]:
                return
            path = self.cache / self.cache_key(prof)
            engine = self._load_or_build(path, prof)
            check_engine_io(engine, self._trt, self.spec)
            if engine.num_optimization_profiles < self.contexts:
                raise RuntimeError(f"{path} has {engine.num_optimization_profiles} optimization profiles, "
                                   f"expected {self.contexts}: delete it to rebuild")
            old, rows = self._pool, prof[2]
            self._pool = ContextPool(lambda i, e=engine: _Slot(self, e, i, rows), self.contexts)
            self._engine, self._profile, self._engine_path = engine, prof, path
            self._current = (self._pool, prof)
        if old is not None:
            old.retire()

    # -- protocol ---------------------------------------------------------------------------

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Build or load the engine for these sizes, then run each once."""
        self._ensure(batch_sizes)
        for n in sorted(set(int(b) for b in batch_sizes if int(b) > 0)):
            self.infer(np.zeros((n, self.spec.n_columns), dtype=np.float32))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n, f] -> float32 [n]; thread-safe (one pooled context per call)."""
        if not hasattr(self, "_runtime"):
            raise RuntimeError("backend not loaded: call load() first")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.n_columns:
            raise ValueError(f"expected a float32 [n, {self.spec.n_columns}] batch, got shape {x.shape}")
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        if self._engine is None:
            self._ensure(DEFAULT_BATCH_SIZES)
        while True:
            if self._current is None:
                raise RuntimeError("backend closed")
            pool, prof = self._current
            try:
                slot = pool.acquire()
                break
            except PoolRetired:  # a warmup with larger sizes replaced the engine meanwhile
                continue
        try:
            pieces = gpu_common.chunks(len(x), prof)  # type: ignore[arg-type]
            if len(pieces) == 1:
                return self._run(slot, x)
            return np.concatenate([self._run(slot, x[a:b]) for a, b in pieces])
        finally:
            pool.release(slot)

    def _run(self, st: _Slot, x: np.ndarray) -> np.ndarray:
        cu, rt = st.cu, st.cu.rt
        cu("cudaSetDevice", self._dev_id)  # the current device is per thread; slots move between threads
        n, f = x.shape
        st.in_view[:n] = x
        cu("cudaMemcpyAsync", st.d_in, st.h_in, n * f * 4, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, st.stream)
        if not st.context.set_input_shape(self.spec.input_name, (n, f)):
            raise ValueError(f"batch of {n} rows is outside the engine's profile {self._profile}")
        if not st.context.execute_async_v3(int(st.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        cu("cudaMemcpyAsync", st.h_out, st.d_out, n * 4, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, st.stream)
        cu("cudaStreamSynchronize", st.stream)
        return st.out_view[:n].copy()

    def describe(self) -> dict:
        """Engine, GPU, TensorRT version, precision, profile and contexts."""
        return {
            "name": self.name,
            "device": self.device,
            "tensorrt": getattr(getattr(self, "_trt", None), "__version__", None),
            "gpu": getattr(self, "_gpu", None),
            "compute_capability": getattr(self, "_cc", None),
            "fp16": self.fp16,
            "tf32": self.tf32,
            "precision": gpu_common.precision_tag(self.fp16, self.tf32),
            "profile": list(self._profile or ()),
            "contexts": self.contexts,
            "engine": str(self._engine_path) if self._engine_path else None,
            "model": self.spec.name,
            "model_version": self.spec.version,
            "input_name": self.spec.input_name,
            "output_name": self.spec.output_name,
            "n_features": self.spec.n_columns,
        }

    def close(self) -> None:
        """Free every context's buffers and streams."""
        with self._lock:
            pool, self._pool, self._current = self._pool, None, None
        if pool is not None:
            pool.retire()
