"""ONNX Runtime backend: CPU, or CUDA through the CUDA execution provider.

(The TensorRT execution provider is ``onnxruntime_tensorrt_backend``, a subclass.)

One ``InferenceSession`` is shared by all inference threads: ``session.run``
is thread-safe and releases the GIL. ``threads`` sets intra-op threads per
call; inter-op parallelism is off (the graph is a small MLP).

On a GPU (``device = "cuda[:N]"``) the backend refuses to start, naming the fix, when
onnxruntime-gpu is missing, when the CPU onnxruntime is installed over it, or when the driver
sees no GPU; it preloads the CUDA/cuDNN libraries of the ``nvidia-*`` wheels
(``onnxruntime.preload_dlls``) before the session, and runs FP32 as FP32: the CUDA EP's
``use_tf32`` is off unless ``SLUICE_GPU_ALLOW_TF32=1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from workers.inference import gpu_common
from workers.inference.base import BackendUnavailable
from workers.inference.gpu_common import GPU_HINT

if TYPE_CHECKING:  # pragma: no cover
    from workers.features import ModelSpec

CPU_HINT = "pip install 'sluice[cpu]' (or 'sluice[gpu]' on a GPU host: one of the two, never both)"
CUDA_EP = "CUDAExecutionProvider"


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU or through the CUDA execution provider (see the module docstring)."""

    name = "onnxruntime"

    def __init__(self, spec: "ModelSpec", device: str = "cpu", threads: int = 1):
        self.spec = spec
        self.device = device
        self.threads = threads
        self.tf32 = gpu_common.tf32_allowed()
        self._session = None
        self._providers: list = []
        self._preload: str | None = None

    def load(self) -> None:
        """Open the session on the CPU, or on the CUDA EP after checking the GPU runtime."""
        if self.device == "cpu":
            self._ort()
            self._open(["CPUExecutionProvider"], required=None)
            return
        self._gpu_runtime(CUDA_EP)
        self._open([(CUDA_EP, self.cuda_options()), "CPUExecutionProvider"], required=CUDA_EP)

    def cuda_options(self) -> dict:
        """CUDA EP options: the device, and TF32 off unless SLUICE_GPU_ALLOW_TF32=1.

        ORT's CUDA EP defaults ``use_tf32`` to on, which on Ampere and later rounds FP32 matrix
        inputs to a 10-bit mantissa: ~1e-3 score differences against the 1e-5 parity tolerance.
        """
        return {"device_id": str(self._device_id()), "use_tf32": "1" if self.tf32 else "0"}

    def _gpu_runtime(self, *providers: str):
        """Check that onnxruntime can run ``providers`` on a GPU here; preload the CUDA libraries.

        Compiled-in providers are not enough: the CPU wheel installed over onnxruntime-gpu, or a
        host without a GPU, would otherwise fail at the first batch or fall back to the CPU.
        """
        ort = self._ort()
        conflict = gpu_common.onnxruntime_conflict()
        if conflict:
            raise BackendUnavailable(f"device {self.device!r}: {conflict}")
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendUnavailable(
                f"device {self.device!r} needs onnxruntime's {' and '.join(missing)}, but this onnxruntime "
                f"only has {available}: {GPU_HINT}")
        count = gpu_common.cuda_device_count()
        if count <= self._device_id():
            raise BackendUnavailable(
                f"device {self.device!r}: the CUDA driver sees {count} GPU(s) (no NVIDIA driver, no GPU, or "
                f"CUDA_VISIBLE_DEVICES hides it); onnxruntime-gpu is installed: {GPU_HINT}")
        if not self.tf32:
            gpu_common.disable_tf32_for_process()
        self._preload = gpu_common.preload_cuda_libraries(ort)
        return ort

    # -- shared with the TensorRT execution provider backend --------------------------------

    def _ort(self):
        try:
            import onnxruntime as ort
        except ImportError as e:  # `pip install .` alone: onnxruntime comes with the cpu / gpu-* extras
            raise BackendUnavailable(f"onnxruntime is not installed: {CPU_HINT} ({e})") from e
        if not self.spec.onnx_path.is_file():
            raise ValueError(
                f"model file {self.spec.onnx_path} not found (artifacts.model in {self.spec.manifest_path}); "
                f"train it with python {self.spec.path}/train.py")
        return ort

    def _device_id(self) -> int:
        return int(self.device.split(":", 1)[1]) if ":" in self.device else 0

    def _open(self, providers: list, required: str | None) -> None:
        """Create the session; ``required``: the provider that must be in use (no silent CPU fallback)."""
        ort = self._ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads == 1:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            sess = ort.InferenceSession(str(self.spec.onnx_path), sess_options=so, providers=providers)
        except Exception as e:
            if self.device != "cpu":
                why = f" ({self._preload})" if self._preload else ""
                raise BackendUnavailable(f"could not start onnxruntime on {self.device}: {e}{why}. {GPU_HINT}") from e
            raise ValueError(f"could not load {self.spec.onnx_path}: {e}") from e
        if required is not None and required not in sess.get_providers():
            # ORT falls back to CPU silently when CUDA/TensorRT fail to initialise; we do not.
            why = f"; {self._preload}" if self._preload else ""
            raise BackendUnavailable(
                f"onnxruntime could not initialise {required} on {self.device} "
                f"(providers in use: {sess.get_providers()}{why}): {GPU_HINT}")
        inputs = {i.name: i for i in sess.get_inputs()}
        outputs = {o.name for o in sess.get_outputs()}
        if self.spec.input_name not in inputs:
            raise ValueError(f"{self.spec.onnx_path}: no input named {self.spec.input_name!r} (onnx.input in the manifest); "
                             f"the graph has {sorted(inputs)}")
        if self.spec.output_name not in outputs:
            raise ValueError(f"{self.spec.onnx_path}: no output named {self.spec.output_name!r} (onnx.output in the manifest); "
                             f"the graph has {sorted(outputs)}")
        shape = inputs[self.spec.input_name].shape
        width = shape[-1] if shape else None
        if isinstance(width, int) and width != self.spec.n_columns:
            raise ValueError(f"{self.spec.onnx_path}: input width {width} != {self.spec.n_columns} feature columns "
                             f"in {self.spec.manifest_path}; retrain or fix the manifest")
        self._session = sess
        self._providers = sess.get_providers()
        self._run = sess.run
        self._out = [self.spec.output_name]
        self._in = self.spec.input_name

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run each batch size once."""
        for n in sorted(set(int(b) for b in batch_sizes if int(b) > 0)):
            self.infer(np.zeros((n, self.spec.n_columns), dtype=np.float32))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n, f] -> float32 [n] scores."""
        if self._session is None:
            raise RuntimeError("backend not loaded: call load() first")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.n_columns:
            raise ValueError(f"expected a float32 [n, {self.spec.n_columns}] batch, got shape {x.shape}")
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        (y,) = self._run(self._out, {self._in: x})
        return np.asarray(y, dtype=np.float32).reshape(x.shape[0])

    def describe(self) -> dict:
        """What runs: providers, precision, model."""
        return {
            "name": self.name,
            "device": self.device,
            "providers": list(self._providers),
            "precision": "fp32" if self.device == "cpu" else gpu_common.precision_tag(False, self.tf32),
            "intra_op_threads": self.threads,
            "model": self.spec.name,
            "model_version": self.spec.version,
            "model_path": str(self.spec.onnx_path),
            "input_name": self.spec.input_name,
            "output_name": self.spec.output_name,
            "n_features": self.spec.n_columns,
        }
