"""Native TensorRT backend (``backend = "tensorrt"``, device ``cuda[:N]``).

- The engine is built from the model's ONNX with one optimization profile whose
  (min, opt, max) batch rows cover the batch sizes in use (``warmup`` gets them
  from the worker: 1 ... ``max_batch_size``); larger batches are split.
- Engines are cached on disk (``SLUICE_TENSORRT_CACHE_DIR``), keyed by model
  name + version + a hash of the ONNX bytes, GPU name and compute capability,
  TensorRT version, profile and precision; a restart deserializes instead of
  rebuilding. Files are written atomically (temp file + rename) so replicas
  sharing a cache never read a torn engine.
- FP16 when ``SLUICE_TENSORRT_FP16=1`` (off by default: FP32 keeps scores within
  1e-5 of onnxruntime/torch).
- Each inference thread has its own execution context, CUDA stream, pinned host
  buffers and device buffers (sized to the profile's max), so threads run
  batches concurrently: H2D copy, ``execute_async_v3``, D2H copy, then one
  stream synchronize.

TensorRT and cuda-python are imported lazily (``pip install 'sluice[gpu]'``);
the CPU machine never needs them. API: TensorRT 10 Python (``trt.Builder``,
``create_optimization_profile``, ``build_serialized_network``,
``IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3``)
and cuda-python's runtime bindings.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import tempfile
import threading
from typing import TYPE_CHECKING, Sequence

import numpy as np

from workers.inference.base import BackendUnavailable
from workers.inference.gpu_common import DEFAULT_BATCH_SIZES, GPU_HINT, cache_dir, fp16_enabled, profile

if TYPE_CHECKING:  # pragma: no cover
    from workers.features import ModelSpec


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as e:
            raise BackendUnavailable(f"backend 'tensorrt' needs cuda-python ({e}): {GPU_HINT}") from e
    return cudart


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


class _ThreadState:
    """One inference thread's context, stream and buffers."""

    def __init__(self, backend: "TensorRTBackend"):
        cu = backend._cu
        cu("cudaSetDevice", backend._dev_id)
        self.cu = cu
        self.context = backend._engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (GPU memory?)")
        self.stream = cu("cudaStreamCreate")
        rows = backend._profile[2]
        f = backend.spec.n_columns
        self.in_bytes = rows * f * 4
        self.out_bytes = rows * 4
        self.h_in = cu("cudaMallocHost", self.in_bytes)
        self.h_out = cu("cudaMallocHost", self.out_bytes)
        self.d_in = cu("cudaMalloc", self.in_bytes)
        self.d_out = cu("cudaMalloc", self.out_bytes)
        self.in_view = np.ctypeslib.as_array((ctypes.c_float * (rows * f)).from_address(int(self.h_in))).reshape(rows, f)
        self.out_view = np.ctypeslib.as_array((ctypes.c_float * rows).from_address(int(self.h_out)))
        self.context.set_tensor_address(backend.spec.input_name, int(self.d_in))
        self.context.set_tensor_address(backend.spec.output_name, int(self.d_out))
        self.generation = backend._generation

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


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, spec: "ModelSpec", device: str = "cuda", threads: int = 1):
        self.spec = spec
        self.device = device
        self.threads = threads
        self.fp16 = fp16_enabled()
        self.cache = cache_dir()
        self._engine = None
        self._profile: tuple[int, int, int] | None = None
        self._engine_path = None
        self._generation = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._states: list[_ThreadState] = []

    # -- load: check everything the build will need, build nothing yet ----------------------

    def load(self) -> None:
        if self.device == "cpu":
            raise BackendUnavailable("backend 'tensorrt' runs on an NVIDIA GPU: set [model] device = \"cuda\" "
                                     "(or use backend 'onnxruntime' / 'torch' on cpu)")
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendUnavailable(f"backend 'tensorrt' needs TensorRT 10, which is not installed ({e}): {GPU_HINT}") from e
        if int(trt.__version__.split(".")[0]) < 10:
            raise BackendUnavailable(f"backend 'tensorrt' needs TensorRT >= 10, found {trt.__version__}: {GPU_HINT}")
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
        digest = hashlib.sha256(self._onnx).hexdigest()[:16]
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self._gpu).strip("-").lower()
        lo, opt, hi = prof
        return (f"{self.spec.name}-{self.spec.version}-{digest}-{gpu}-sm{self._cc}-trt{self._trt.__version__}"
                f"-b{lo}_{opt}_{hi}-{'fp16' if self.fp16 else 'fp32'}.engine")

    def _build(self, prof: tuple[int, int, int]) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(self._onnx):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"TensorRT cannot parse {self.spec.onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        f = self.spec.n_columns
        lo, opt, hi = prof
        p = builder.create_optimization_profile()
        p.set_shape(self.spec.input_name, (lo, f), (opt, f), (hi, f))
        config.add_optimization_profile(p)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine for {self.spec.onnx_path} (see the TensorRT log)")
        return bytes(serialized)

    def _ensure(self, batch_sizes: Sequence[int]) -> None:
        prof = profile(batch_sizes)
        with self._lock:
            if self._engine is not None and self._profile is not None and prof[2] <= self._profile[2]:
                return
            path = self.cache / self.cache_key(prof)
            blob = path.read_bytes() if path.is_file() else None
            engine = self._runtime.deserialize_cuda_engine(blob) if blob else None
            if engine is None:  # not cached, or stale/corrupt: rebuild and replace
                blob = self._build(prof)
                self.cache.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.cache, suffix=".tmp")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(blob)
                os.replace(tmp, path)
                engine = self._runtime.deserialize_cuda_engine(blob)
                if engine is None:
                    raise RuntimeError("TensorRT could not deserialize the engine it just built")
            self._engine = engine
            self._profile = prof
            self._engine_path = path
            self._generation += 1

    # -- protocol ---------------------------------------------------------------------------

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        self._ensure(batch_sizes)
        for n in sorted(set(int(b) for b in batch_sizes if int(b) > 0)):
            self.infer(np.zeros((n, self.spec.n_columns), dtype=np.float32))

    def _state(self) -> _ThreadState:
        st = getattr(self._local, "state", None)
        if st is None or st.generation != self._generation:
            if st is not None:
                st.close()
            st = _ThreadState(self)
            self._local.state = st
            with self._lock:
                self._states.append(st)
        return st

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not hasattr(self, "_runtime"):
            raise RuntimeError("backend not loaded: call load() first")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.n_columns:
            raise ValueError(f"expected a float32 [n, {self.spec.n_columns}] batch, got shape {x.shape}")
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        if self._engine is None:
            self._ensure(DEFAULT_BATCH_SIZES)
        hi = self._profile[2]  # type: ignore[index]
        if len(x) > hi:
            return np.concatenate([self._run(x[i : i + hi]) for i in range(0, len(x), hi)])
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        st = self._state()
        cu, rt = st.cu, st.cu.rt
        n, f = x.shape
        st.in_view[:n] = x
        nbytes = n * f * 4
        cu("cudaMemcpyAsync", st.d_in, st.h_in, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, st.stream)
        if not st.context.set_input_shape(self.spec.input_name, (n, f)):
            raise ValueError(f"batch of {n} rows is outside the engine's profile {self._profile}")
        if not st.context.execute_async_v3(int(st.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        cu("cudaMemcpyAsync", st.h_out, st.d_out, n * 4, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, st.stream)
        cu("cudaStreamSynchronize", st.stream)
        return st.out_view[:n].copy()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "device": self.device,
            "tensorrt": getattr(getattr(self, "_trt", None), "__version__", None),
            "gpu": getattr(self, "_gpu", None),
            "compute_capability": getattr(self, "_cc", None),
            "fp16": self.fp16,
            "profile": list(self._profile or ()),
            "engine": str(self._engine_path) if self._engine_path else None,
            "model": self.spec.name,
            "model_version": self.spec.version,
            "input_name": self.spec.input_name,
            "output_name": self.spec.output_name,
            "n_features": self.spec.n_columns,
        }

    def close(self) -> None:
        with self._lock:
            for st in self._states:
                st.close()
            self._states.clear()
